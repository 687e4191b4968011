"""Generate text with a model trained by ``python -m fastattn.train``:

    python -m fastattn.generate --checkpoint runs/decoder-tiny/checkpoint.pt --prompt "def " --max-new-tokens 200
    python -m fastattn.generate --checkpoint ... --temperature 0            # greedy
    python -m fastattn.generate --checkpoint ... --top-k 40 --top-p 0.9     # sampling
    python -m fastattn.generate --checkpoint ... --device cuda --cuda-graph # decode steps replayed from a CUDA graph

Decoding uses the model's KV cache. For an encoder-decoder checkpoint (trained to restore reversed
text) the encoder reads the prompt backwards (padded with spaces to the training length) and the
decoder writes the restored text.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from fastattn.models import Transformer
from fastattn.models.data import BOS, EOS, decode_tokens, encode_text, reversed_source
from fastattn.models.transformer import ATTN_IMPLS, FFN_IMPLS
from fastattn.train import TrainError, config_from_checkpoint, load_checkpoint


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastattn.generate", description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--checkpoint", required=True, help="DIR/checkpoint.pt written by fastattn.train")
    a("--prompt", default="def ", help="text to continue (encoder-decoder: text to reverse and restore)")
    a("--max-new-tokens", type=int, default=None, help="bytes to generate (default 200; encoder-decoder: the prompt's length)")
    a("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    a("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    a("--top-p", type=float, default=None, help="sample among the most likely tokens of total probability p")
    a("--num-samples", type=int, default=1)
    a("--seed", type=int, default=0)
    a("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    a("--attn", choices=ATTN_IMPLS, default=None, help="attention implementation (default: the checkpoint's)")
    a("--ffn", choices=FFN_IMPLS, default=None, help="feed-forward implementation (default: the checkpoint's)")
    a("--cuda-graph", action="store_true", help="replay each one-token decode step from a CUDA graph (--device cuda)")
    return p


def load_model(path: str, device: str = "cpu", **impl_overrides) -> Transformer:
    """The trained model of a fastattn.train checkpoint, in eval mode."""
    ckpt = load_checkpoint(path)
    cfg = config_from_checkpoint(ckpt, **{k: v for k, v in impl_overrides.items() if v is not None})
    model = Transformer(cfg)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise TrainError(f"{path}: the weights do not fit the checkpoint's own config: {exc}") from None
    return model.to(device).eval()


def generate_text(model: Transformer, prompt: str, args) -> list[str]:
    """``args.num_samples`` continuations (decoder) or restorations (encoder-decoder) of prompt."""
    device = next(model.parameters()).device
    tokens = encode_text(prompt)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator=gen,
                    cuda_graph=getattr(args, "cuda_graph", False))
    n = args.num_samples
    if model.config.arch == "encoder-decoder":
        max_len = model.config.max_seq_len
        if not tokens or len(tokens) > max_len:
            raise TrainError(f"--prompt must have 1 to {max_len} bytes for this encoder-decoder, got {len(tokens)}")
        # The model was trained on windows of max_seq_len bytes, its alignment (target i <-> source
        # max_len-1-i) tied to that length: pad the prompt with spaces to it.
        padded = tokens + [ord(" ")] * (max_len - len(tokens))
        source = reversed_source(torch.tensor([padded] * n, device=device))
        start = torch.full((n, 1), BOS, dtype=torch.long, device=device)
        new = args.max_new_tokens if args.max_new_tokens is not None else len(tokens)
        out = model.generate(start, min(new, max_len), source=source, eos_id=EOS, **sampling)
        return [decode_tokens(row[1:].tolist()) for row in out]
    if not tokens:
        raise TrainError("--prompt is empty: give at least one character to continue")
    idx = torch.tensor([tokens] * n, device=device)
    new = args.max_new_tokens if args.max_new_tokens is not None else 200
    out = model.generate(idx, new, eos_id=EOS, **sampling)
    return [decode_tokens(row.tolist()) for row in out]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if not math.isfinite(args.temperature):
            raise TrainError(f"--temperature must be a finite number >= 0, got {args.temperature}")
        if (args.max_new_tokens or 0) < 0 or args.num_samples < 1 or args.temperature < 0:
            raise TrainError("--max-new-tokens must be >= 0, --num-samples >= 1 and --temperature >= 0")
        if args.top_k is not None and args.top_k < 1:
            raise TrainError(f"--top-k must be >= 1, got {args.top_k}")
        if args.top_p is not None and not 0 < args.top_p <= 1:  # also refuses nan
            raise TrainError(f"--top-p must be in (0, 1], got {args.top_p}")
        if args.device == "cuda" and not torch.cuda.is_available():
            raise TrainError("--device cuda: no CUDA device here")
        if args.cuda_graph and args.device != "cuda":
            raise TrainError("--cuda-graph needs --device cuda")
        model = load_model(args.checkpoint, args.device, attn_impl=args.attn, ffn_impl=args.ffn)
        if model.config.arch == "encoder":
            raise TrainError("an encoder (masked LM) checkpoint does not generate; use a decoder or encoder-decoder one")
        for i, text in enumerate(generate_text(model, args.prompt, args)):
            if args.num_samples > 1:
                print(f"--- sample {i + 1}")
            print(text)
    except TrainError as exc:
        print(f"python -m fastattn.generate: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
