"""EleutherAI's lm-evaluation-harness on lmforge models: `--model lmforge`.

    python -m lmforge.evaluation.lm_eval_adapter --model lmforge --model_args pretrained=runs/quickstart \
        --tasks my_task --include_path tasks/ --output_path results/

This module registers the `lmforge` model type and then runs lm_eval's own command line, so
every lm_eval option works, `--apply_chat_template` included (the model's own template, as `lmforge chat`
renders it). From Python: `lm_eval.simple_evaluate(model=LmforgeLM("..."), tasks=[...])`.
`pretrained` is anything `lmforge.load` reads (a built-in name, .gguf, HF folder, checkpoint).
As lm_eval's transformers model does, special-token strings in a request's text are those tokens: the markup
of a chat-templated prompt must be.
"""

from __future__ import annotations

import torch

from lmforge.errors import LmforgeError, missing_extra

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError:
    raise missing_extra("the lm-evaluation-harness adapter", "lm_eval", "eval") from None

from lmforge.evaluation.evaluate import continuation_log_likelihood, text_perplexity
from lmforge.inference.chat import chat_template as template_of
from lmforge.inference.chat import render_chat
from lmforge.inference.generate import SamplingConfig, generate


@register_model("lmforge")
class LmforgeLM(LM):
    """The three request types lm_eval asks of a model, answered with lmforge's own scoring code."""

    def __init__(self, pretrained: str = "smollm2-135m-instruct", max_gen_toks: int = 256, **_ignored):
        super().__init__()
        from lmforge.formats.loading import load

        # fp32 scoring: log-likelihoods compared across choices should not carry quantisation noise.
        self.model, self.tokenizer = load(pretrained, keep_quantized=False)
        self.pretrained = pretrained
        self.max_gen_toks = int(max_gen_toks)

    @property
    def tokenizer_name(self) -> str:
        """What lm_eval's request cache tells chat-templated requests apart by."""
        return str(self.pretrained)

    def chat_template(self, chat_template: bool | str = False) -> str:
        """The template `apply_chat_template` renders with: the model's own (lm_eval logs it). A model here has
        one template, so a named one (`--apply_chat_template NAME`) is refused rather than ignored."""
        if isinstance(chat_template, str) and chat_template:
            raise LmforgeError(
                f"--apply_chat_template {chat_template}: an lmforge model has one chat template, its own; "
                "give --apply_chat_template without a name"
            )
        return template_of(self.tokenizer)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """A few-shot conversation as the prompt text the model's template makes of it. Without the generation
        prompt, the last (assistant) message is left open to be continued, as transformers'
        `continue_final_message` does for lm_eval's assistant prefills."""
        tokenizer = self.tokenizer
        rendered = render_chat(
            chat_history, template_of(tokenizer), add_generation_prompt, tokenizer.bos_token, tokenizer.eos_token
        )
        if add_generation_prompt or not chat_history or chat_history[-1]["role"] != "assistant":
            return rendered
        final = chat_history[-1]["content"].strip()
        end = rendered.rfind(final)
        return rendered[: end + len(final)] if final and end >= 0 else rendered

    @torch.no_grad()
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        results = []
        for request in requests:
            context, continuation = request.args
            log_likelihood, greedy, _ = continuation_log_likelihood(
                self.model, self.tokenizer, context, continuation, special_tokens=True
            )
            results.append((log_likelihood, greedy))
        return results

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Whole-text log-likelihood (perplexity tasks): `text_perplexity`'s sliding window, as a sum."""
        results = []
        for request in requests:
            scored = text_perplexity(self.model, self.tokenizer, request.args[0])
            results.append(-scored["loss"] * scored["tokens"])
        return results

    def generate_until(self, requests) -> list[str]:
        outputs = []
        for request in requests:
            context, options = request.args
            until = options.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            sampling = SamplingConfig(
                max_new_tokens=int(options.get("max_gen_toks", self.max_gen_toks)),
                temperature=float(options.get("temperature", 0.0)),
                stop=until,
                seed=0,
            )
            prompt_ids = self.tokenizer.with_document_marks(self.tokenizer.encode_with_special_tokens(context))
            text = "".join(generate(self.model, self.tokenizer, prompt_ids, sampling))
            for stop in until:
                text = text.split(stop)[0]
            outputs.append(text)
        return outputs


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
