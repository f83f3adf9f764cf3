"""The kit's own prompt set for the sentiment task: short requests for reviews, stories, notes, messages and
descriptions whose tone the policy is free to choose, so a sentiment reward has something to steer.

Every prompt is a request template filled with a subject. Subjects, not prompts, are split between train and
test, so no held-out subject is ever seen in training; the split and the sampling are fixed by a seed.
"""

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from recipes.errors import RecipeError


@dataclass(frozen=True)
class PromptKind:
    """Request templates (each with one `{subject}` slot) and the subjects that fit all of them."""

    templates: tuple[str, ...]
    subjects: tuple[str, ...]


KINDS = {
    "place": PromptKind(
        templates=(
            "Write a two-sentence review of {subject}.",
            "Describe {subject} to someone who has never been there.",
            "Write a short message to a friend about your visit to {subject}.",
            "Write an online review of {subject} in under fifty words.",
            "Write a diary note about an afternoon at {subject}.",
        ),
        subjects=(
            "a neighbourhood bakery",
            "the local swimming pool",
            "a small bookshop near the station",
            "the public library on the high street",
            "a family-run Italian restaurant",
            "the bus station in the city centre",
            "a hotel by the seaside",
            "a student hostel",
            "the town museum",
            "a garden centre",
            "a corner shop that stays open late",
            "the doctor's waiting room",
            "a climbing gym",
            "a youth football club",
            "the post office",
            "a vegetarian cafe",
            "an old cinema",
            "a ramen bar",
            "the city zoo",
            "a car wash",
            "a village pub",
            "a launderette",
            "a hair salon",
            "a farmers' market",
            "the airport departure lounge",
            "a campsite in the hills",
            "a night bus",
            "a bowling alley",
            "a playground in the park",
            "a recycling centre",
        ),
    ),
    "product": PromptKind(
        templates=(
            "Write a short review of the {subject} you bought last month.",
            "Describe your new {subject} in three sentences.",
            "Write a customer comment about the {subject} you ordered online.",
            "Tell a friend, in a short message, what you think of your {subject}.",
            "Write a two-sentence product review of this {subject}.",
        ),
        subjects=(
            "pair of running shoes",
            "electric kettle",
            "secondhand bicycle",
            "winter coat",
            "phone case",
            "office chair",
            "set of kitchen knives",
            "robot vacuum cleaner",
            "rain jacket",
            "board game",
            "pair of headphones",
            "reading lamp",
            "coffee grinder",
            "garden hose",
            "school backpack",
            "desk fan",
            "wristwatch",
            "travel suitcase",
            "yoga mat",
            "frying pan",
            "e-reader",
            "umbrella",
            "sofa bed",
            "alarm clock",
            "camping tent",
            "toaster",
            "set of paintbrushes",
            "baby stroller",
            "wool scarf",
            "keyboard",
        ),
    ),
    "experience": PromptKind(
        templates=(
            "Describe {subject}.",
            "Write a diary entry about {subject}.",
            "Tell a short story about {subject}.",
            "Write a text message to your sister about {subject}.",
            "Write three sentences about {subject}.",
        ),
        subjects=(
            "your commute this morning",
            "your first day at a new job",
            "a long wait at the airport",
            "a power cut during dinner",
            "moving into a new flat",
            "a weekend camping trip",
            "learning to ride a bicycle as an adult",
            "a surprise birthday party",
            "a visit to the dentist",
            "a delayed train home",
            "a school reunion",
            "a driving test",
            "a cooking class",
            "a neighbour's loud party",
            "losing your keys",
            "a job interview",
            "a rainy holiday at the coast",
            "a marathon you ran",
            "a night without sleep before an exam",
            "a trip to the hospital",
            "a first date",
            "a garage sale",
            "a week of working from home",
            "a flight with a crying baby",
            "a day of volunteering",
            "a dinner with your in-laws",
            "a broken boiler in winter",
            "your last haircut",
            "a power walk in the snow",
            "a street festival",
        ),
    ),
    "story": PromptKind(
        templates=(
            "Write a three-sentence story about {subject}.",
            "Tell a short bedtime story about {subject}.",
            "Write the opening lines of a story about {subject}.",
            "Write a short story in which {subject} gets unexpected news.",
            "Write a short fable about {subject}.",
        ),
        subjects=(
            "a lighthouse keeper",
            "a retired postman",
            "an old dog",
            "a robot that repairs clocks",
            "a girl who collects stones",
            "a lonely astronaut",
            "a baker who cannot smell",
            "a cat that lives in a library",
            "two rival gardeners",
            "a taxi driver on the night shift",
            "a shy dragon",
            "a fisherman and his daughter",
            "a street musician",
            "a boy who lost his shadow",
            "a grandmother learning to code",
            "a ship's cook",
            "a village teacher",
            "a tired superhero",
            "a pair of lost gloves",
            "an owl that cannot fly",
            "a ghost in a new house",
            "a chess champion",
            "a mountain guide",
            "a small town mayor",
            "a talking umbrella",
            "a beekeeper",
            "a detective on holiday",
            "a circus clown",
            "a scarecrow",
            "a night watchman",
        ),
    ),
    "message": PromptKind(
        templates=(
            "Write a short message to {subject} about the weekend.",
            "Write a two-line note to {subject}.",
            "Write an email to {subject} about a change of plans.",
            "Write a text message to {subject} explaining that you will be late.",
            "Write a short note to {subject} about what happened yesterday.",
        ),
        subjects=(
            "your landlord",
            "a coworker",
            "your neighbour",
            "a former teacher",
            "your team",
            "your best friend",
            "your manager",
            "the school",
            "your grandmother",
            "a customer",
            "your flatmate",
            "the building caretaker",
            "an old classmate",
            "your football coach",
            "your cousin",
            "a new colleague",
            "your piano teacher",
            "the parents of your child's friend",
            "your dentist's office",
            "a shop assistant who helped you",
            "your book club",
            "your brother",
            "the delivery driver",
            "your running partner",
            "the local council",
            "your babysitter",
            "a hotel receptionist",
            "your tenant",
            "your choir",
            "your doctor",
        ),
    ),
    "scene": PromptKind(
        templates=(
            "Describe {subject}.",
            "Write a few sentences about {subject}.",
            "Write a postcard describing {subject}.",
            "Describe {subject} in two sentences.",
            "Write a short poem about {subject}.",
        ),
        subjects=(
            "a foggy morning by the river",
            "the first snow of the winter",
            "a crowded summer beach",
            "the view from your window",
            "a market on a Saturday morning",
            "an empty office on a Sunday",
            "a thunderstorm over the city",
            "a quiet country road",
            "a hospital corridor at night",
            "a train platform at rush hour",
            "an abandoned factory",
            "a park in autumn",
            "a harbour at sunset",
            "a school playground after the last bell",
            "a motorway traffic jam",
            "a desert at noon",
            "a frozen lake",
            "a kitchen after a big family meal",
            "a city square on New Year's Eve",
            "a forest after rain",
            "a car park at midnight",
            "a village in the mountains",
            "a waiting room at the vet",
            "a beach in winter",
            "a rooftop in summer",
            "an allotment in spring",
            "a supermarket just before closing",
            "a stadium after the match",
            "a bridge in heavy wind",
            "a cafe terrace in the morning sun",
        ),
    ),
    "food": PromptKind(
        templates=(
            "Write a short review of {subject}.",
            "Describe {subject} to a friend.",
            "Write a comment for a recipe blog about {subject}.",
            "Write two sentences about {subject}.",
            "Write a message to the cook about {subject}.",
        ),
        subjects=(
            "a bowl of tomato soup",
            "the canteen lunch today",
            "a homemade lemon cake",
            "a takeaway pizza",
            "your grandmother's stew",
            "a cup of hotel coffee",
            "a street food taco",
            "a vegan burger",
            "the school dinner",
            "a plate of fish and chips",
            "a birthday cake from the supermarket",
            "a bowl of porridge",
            "airline food",
            "a curry from the place next door",
            "a picnic sandwich",
            "a salad from the train station",
            "a pot of green tea",
            "your first attempt at bread",
            "a plate of pancakes",
            "a hospital breakfast",
            "a bowl of noodles",
            "a slice of apple pie",
            "a barbecue in the garden",
            "a box of chocolates",
            "an omelette",
            "a cheese board",
            "a smoothie",
            "a roast dinner",
            "a bag of crisps",
            "a fruit salad",
        ),
    ),
}


@dataclass(frozen=True)
class PromptSplits:
    """Plain-text prompts for training and for held-out evaluation; no subject appears in both."""

    train: list[str]
    test: list[str]


def sentiment_prompt_splits(
    seed: int = 0, train_size: int = 400, test_size: int = 100, test_subject_fraction: float = 0.2
) -> PromptSplits:
    """Holds out `test_subject_fraction` of each kind's subjects, then draws `train_size` and `test_size` distinct
    (template, subject) prompts from the two sides. The same arguments always give the same prompts."""
    rng = random.Random(seed)
    train_pool, test_pool = [], []
    for kind in KINDS.values():
        subjects = list(kind.subjects)
        rng.shuffle(subjects)
        held_out = math.ceil(test_subject_fraction * len(subjects))
        for pool, chosen in ((test_pool, subjects[:held_out]), (train_pool, subjects[held_out:])):
            pool.extend(template.format(subject=s) for s in chosen for template in kind.templates)
    for name, pool, size in (("train", train_pool, train_size), ("test", test_pool, test_size)):
        if size > len(pool):
            raise RecipeError(f"{name}_size: {size} is more than the {len(pool)} distinct {name} prompts")
    return PromptSplits(train=rng.sample(train_pool, train_size), test=rng.sample(test_pool, test_size))


def write_prompt_splits(output_dir: str | Path, splits: PromptSplits) -> dict[str, Path]:
    """Writes `train.jsonl` and `test.jsonl` (one `{"prompt": ...}` per line) and returns their paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, prompts in (("train", splits.train), ("test", splits.test)):
        paths[split] = output_dir / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps({"prompt": prompt}) + "\n" for prompt in prompts))
    return paths
