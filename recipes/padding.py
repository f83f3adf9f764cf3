"""A pad token distinct from EOS, for the policy's tokenizer and for reward models' own tokenizers."""

from transformers import PreTrainedTokenizerBase

from recipes.errors import RecipeError


def unused_special_token(tokenizer: PreTrainedTokenizerBase) -> str:
    """A special token that is neither EOS nor BOS nor used by the chat template, so it never occurs in prompts
    or responses."""
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    reserved = {tokenizer.eos_token, tokenizer.bos_token}
    for token in [tokenizer.unk_token, *tokenizer.all_special_tokens]:
        if token and token not in reserved and token not in template:
            return token
    raise RecipeError(
        "pad_token: the tokenizer has no pad token distinct from EOS and no spare special token; "
        "set pad_token to a token of its vocabulary that never occurs in the data"
    )
