"""EleutherAI's lm-evaluation-harness on lmforge models: `--model lmforge`.

    python -m lmforge.evaluation.lm_eval_adapter --model lmforge --model_args pretrained=runs/quickstart \
        --tasks my_task --include_path tasks/ --output_path results/

This module registers the `lmforge` model type and then runs lm_eval's own command line, so
every lm_eval option works. From Python: `lm_eval.simple_evaluate(model=LmforgeLM("..."), tasks=[...])`.
`pretrained` is anything `lmforge.load` reads (a built-in name, .gguf, HF folder, checkpoint).
"""

from __future__ import annotations

import torch

from lmforge.errors import missing_extra

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError:
    raise missing_extra("the lm-evaluation-harness adapter", "lm_eval", "eval") from None

from lmforge.evaluation.evaluate import continuation_log_likelihood, text_perplexity
from lmforge.inference.generate import SamplingConfig, generate


@register_model("lmforge")
class LmforgeLM(LM):
    """The three request types lm_eval asks of a model, answered with lmforge's own scoring code."""

    def __init__(self, pretrained: str = "smollm2-135m-instruct", max_gen_toks: int = 256, **_ignored):
        super().__init__()
        from lmforge.formats.loading import load

        # fp32 scoring: log-likelihoods compared across choices should not carry quantisation noise.
        self.model, self.tokenizer = load(pretrained, keep_quantized=False)
        self.max_gen_toks = int(max_gen_toks)

    @torch.no_grad()
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        results = []
        for request in requests:
            context, continuation = request.args
            log_likelihood, greedy, _ = continuation_log_likelihood(self.model, self.tokenizer, context, continuation)
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
            text = "".join(generate(self.model, self.tokenizer, context, sampling))
            for stop in until:
                text = text.split(stop)[0]
            outputs.append(text)
        return outputs


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
