"""The project's own small real model: a GPT-2 trained here, offline, on Python's standard library.

Random weights cannot tell a good router from a bad one; this model can.  The recipe is fixed
and seeded:

- text: the ``*.py`` files at the top of the interpreter's standard library (``sysconfig``
  ``stdlib`` path), sorted by name; every 20th file (by that order) is held out;
- tokenizer: byte-level BPE trained with ``tokenizers`` on the training files (4096 ids);
- model: ``transformers`` GPT-2, 4 layers, width 256, 4 heads, context 256, trained with AdamW
  on 2 CPU threads for ``--steps`` (the committed model: 1000, about 10 minutes here) or ``--minutes``;
- output: ``model.safetensors`` (float16) + ``config.json`` + ``tokenizer.json`` + ``recipe.json``
  (steps, loss curve, held-out loss) + ``heldout.txt`` (the held-out text, so evaluation does not
  depend on this machine's interpreter).

The result is committed under ``spherefmt/data/tiny-gpt2/`` and is the demo's default model.

    python -m spherefmt.tinymodel --out spherefmt/data/tiny-gpt2 --steps 1000
"""

from __future__ import annotations

import argparse
import json
import math
import sysconfig
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DATA", "corpus", "train", "default_model"]

DATA = Path(__file__).parent / "data" / "tiny-gpt2"
VOCAB = 4096
CONTEXT = 256


def corpus(held_every: int = 20) -> tuple[list[str], list[str]]:
    """(training texts, held-out texts) from the standard library, in a fixed order."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    train = [t for i, t in enumerate(texts) if i % held_every != held_every - 1]
    held = [t for i, t in enumerate(texts) if i % held_every == held_every - 1]
    return train, held


def _tokenizer(train_texts: list[str]) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(train_texts, trainer)
    return tok


def _ids(tok: Any, texts: list[str]) -> np.ndarray:
    eos = tok.token_to_id("<|endoftext|>")
    out: list[int] = []
    for t in texts:
        out += tok.encode(t).ids + [eos]
    return np.asarray(out, dtype=np.int64)


def train(out: Path, minutes: float = 12.0, steps: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Train the model and write it to ``out``; returns the recipe record."""
    import torch
    from tqdm.auto import tqdm
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    torch.set_num_threads(2)
    rng = np.random.default_rng(seed)
    train_texts, held_texts = corpus()
    tok = _tokenizer(train_texts)
    data, held = _ids(tok, train_texts), _ids(tok, held_texts)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=CONTEXT, n_embd=256, n_layer=4, n_head=4,
                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05, betas=(0.9, 0.95))
    batch, seq = 16, 128
    budget_s = minutes * 60
    total = steps or 10**9
    warm = 100
    t0 = time.perf_counter()
    losses: list[float] = []
    bar = tqdm(total=steps, desc="train", unit="step")
    step = 0
    while step < total and (steps is not None or time.perf_counter() - t0 < budget_s):
        # cosine over the expected number of steps (time budget: estimated from the pace so far)
        est = steps or max(warm + 1, int(budget_s / max(1e-3, (time.perf_counter() - t0) / max(1, step))))
        lr = 2e-3 * min(1.0, (step + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / est))))
        for g in opt.param_groups:
            g["lr"] = lr
        starts = rng.integers(0, len(data) - seq - 1, batch)
        x = torch.from_numpy(np.stack([data[s : s + seq] for s in starts]))
        loss = model(x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss))
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    bar.close()
    model.eval()
    with torch.no_grad():
        nll, n = 0.0, 0
        for s in range(0, min(len(held) - 1, 64 * CONTEXT), CONTEXT):
            w = torch.from_numpy(held[s : s + CONTEXT + 1])
            logits = model(w[None, :-1]).logits[0]
            nll += float(torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum"))
            n += len(w) - 1
    out.mkdir(parents=True, exist_ok=True)
    model.half().save_pretrained(out, safe_serialization=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "heldout.txt").write_text("".join(held_texts[:3])[:120_000], encoding="utf-8")
    record = {"recipe": "python -m spherefmt.tinymodel --steps " + str(step) + "; " + " ".join(__doc__.split("\n\n")[2].split()), "steps": step, "seconds": time.perf_counter() - t0,
              "batch": batch, "seq": seq, "train_tokens": int(len(data)), "heldout_tokens": int(len(held)),
              "loss_every_50": [float(np.mean(losses[i : i + 50])) for i in range(0, len(losses), 50)],
              "heldout_nll_f32": nll / n, "heldout_ppl_f32": math.exp(nll / n), "seed": seed}
    (out / "recipe.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def default_model() -> Path:
    """The committed small model's folder (a Hugging Face ``save_pretrained`` folder)."""
    return DATA


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(DATA))
    ap.add_argument("--minutes", type=float, default=12.0)
    ap.add_argument("--steps", type=int)
    a = ap.parse_args(argv)
    rec = train(Path(a.out), a.minutes, a.steps)
    print(f"{rec['steps']} steps in {rec['seconds']:.0f}s; held-out ppl {rec['heldout_ppl_f32']:.2f} -> {a.out}")


if __name__ == "__main__":
    main()
