"""The streaming runtime against Hugging Face ``transformers`` on the same weights, under budgets."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

import spherefmt
from spherefmt import heap
from spherefmt.backends import get_backend
from spherefmt.errors import BackendUnavailableError, BudgetExceededError, FormatError, InputError, UnknownBackendError
from spherefmt.runtime import Session, parse_budget
from spherefmt.testing import gpt2_config, llama_config, make_gpt2, make_llama, save_hf_folder
from tests.helpers import run_cli, started_backends

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

BACKENDS = started_backends()

IDS = np.random.default_rng(7).integers(0, 512, 20)


def _perturb_norms(sd: dict[str, np.ndarray], seed: int) -> None:
    """Random norm weights and biases, so that a forward pass that ignores them fails."""
    rng = np.random.default_rng(seed)
    for k, v in sd.items():
        if "ln" in k or "norm" in k:
            sd[k] = (v + rng.standard_normal(v.shape).astype(v.dtype) * 0.1).astype(v.dtype)


def _make(tmp: Path, arch: str) -> tuple[Path, dict]:
    if arch == "gpt2":
        cfg = gpt2_config(n_layer=6, n_embd=128, n_head=4, vocab_size=512, n_positions=48)
        sd = make_gpt2(cfg, "F32", seed=3)
    else:
        cfg = llama_config(num_hidden_layers=5, hidden_size=128, intermediate_size=344, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=512)
        cfg["max_position_embeddings"] = 48
        sd = make_llama(cfg, "F32", seed=3)
    _perturb_norms(sd, 5)
    src = tmp / f"{arch}-hf"
    save_hf_folder(src, sd, cfg)
    return src, cfg


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request, tmp_path_factory):
    """(arch, HF folder, dir package, vhd package, reference logits of IDS, reference greedy ids)."""
    tmp = tmp_path_factory.mktemp(request.param)
    src, _ = _make(tmp, request.param)
    pkg = tmp / "m.sphere"
    vhd = tmp / "m.vhd"
    spherefmt.save(src, pkg, graticule="2x4")
    spherefmt.save(src, vhd, graticule="2x4")
    hf = transformers.AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor(IDS)[None]).logits[0].numpy()
        gen = hf.generate(torch.tensor(IDS[:6])[None], max_new_tokens=8, do_sample=False, min_new_tokens=8,
                          pad_token_id=0)[0, 6:].tolist()
    return request.param, src, pkg, vhd, ref, gen


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["dir", "vhd"])
def test_dense_logits_equal_transformers(model, backend, where):
    _, _, pkg, vhd, ref, _ = model
    with Session(pkg if where == "dir" else vhd, backend=backend) as s:
        out = s.logits(IDS)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_generation_equals_transformers(model, backend):
    _, _, pkg, _, _, gen = model
    with Session(pkg, backend=backend) as s:
        assert s.generate(IDS[:6], max_new_tokens=8, stop_at_eos=False) == gen


@pytest.mark.parametrize("backend", BACKENDS)
def test_quarter_budget_holds_and_changes_nothing(model, backend):
    _, _, pkg, vhd, _, _ = model
    with Session(pkg, backend=backend, fused_ffn=False) as s:  # cell by cell, as the 25% run must
        full = s.logits(IDS)
        full_gen = s.generate(IDS[:6], max_new_tokens=8, stop_at_eos=False)
        weights = s.weight_bytes
    with Session(pkg, backend=backend) as s:  # resident: each layer's FFN as one block
        assert s.model.fused_ffn
        fused = s.logits(IDS)
        assert s.generate(IDS[:6], max_new_tokens=8, stop_at_eos=False) == full_gen
    with Session(vhd, backend=backend, budget="25%", prefetch=True) as s:
        assert s.budget == weights // 4 and not s.model.fused_ffn  # two layer blocks do not fit
        out = s.logits(IDS)
        gen = s.generate(IDS[:6], max_new_tokens=8, stop_at_eos=False)
        st = s.stats()
    np.testing.assert_array_equal(out, full)  # same chunking, same order of sums: bit-identical
    assert gen == full_gen
    # the fused sum differs from the per-cell one in summation order only
    assert np.abs(fused - full).max() <= 1e-5 * np.abs(full).max()
    assert st["peak_device_bytes"] <= st["budget_bytes"]
    assert st["peak_device_bytes"] > st["budget_bytes"] // 2  # the budget is used, not dodged
    assert st["experts_evicted"] > 0 and st["blocks_evicted"] > 0
    assert st["prefetch_hits"] > 0 and st["prefetch_loads"] >= st["prefetch_hits"]
    assert st["bytes_uploaded"] > weights  # streamed: more than one pass over the weights


def test_unlimited_run_reads_each_block_once(model):
    _, _, pkg, _, _, _ = model
    with Session(pkg, backend="numpy") as s:
        s.logits(IDS)
        s.generate(IDS[:4], max_new_tokens=4)
        st = s.stats()
    assert st["blocks_evicted"] == 0
    assert st["bytes_uploaded"] == st["resident_bytes"] <= st["weight_bytes"]
    assert st["cache_hit_rate"] > 0.5


def test_too_small_budget_is_refused_with_the_minimum(model):
    _, _, pkg, _, _, _ = model
    with Session(pkg, backend="numpy") as s:
        least = s.minimum_budget(1)
    with pytest.raises(BudgetExceededError, match=rf"too small.*at least .*\({least} bytes\)"):
        Session(pkg, backend="numpy", budget=least - 1)
    with Session(pkg, backend="numpy", budget=least) as s:  # runs a token, not a 48-token context
        assert [k for k, _ in heap._USERS] == (["reuse"] if heap._glibc() else [])  # blocks stream
        assert s.logits([5]).shape == (1, 512)
        assert s.stats()["peak_device_bytes"] <= least
        with pytest.raises(BudgetExceededError, match="cannot hold a context of 48 tokens"):
            s.logits(np.arange(48))
    assert heap._USERS == []  # the session's malloc policy ends with it
    with Session(pkg, backend="numpy"):
        assert heap._USERS == []  # resident: nothing streams, glibc's own rule stays


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_k_all_cells_equals_dense_and_fewer_cells_differ(model, backend):
    _, _, pkg, _, _, _ = model
    with Session(pkg, backend=backend) as s:
        dense = s.logits(IDS)
    with Session(pkg, backend=backend, top_k=8) as s:  # 2x4 graticule: every cell
        np.testing.assert_array_equal(s.logits(IDS), dense)
    with Session(pkg, backend=backend, top_k=2, budget="40%") as s:
        sparse = s.logits(IDS)
        st = s.stats()
    assert st["active_cell_fraction"] == pytest.approx(0.25)
    assert not np.allclose(sparse, dense, atol=1e-4)
    assert np.isfinite(sparse).all()
    assert st["peak_device_bytes"] <= st["budget_bytes"]


def test_top_k_decode_reads_less_than_dense(model):
    _, _, pkg, _, _, _ = model
    figures = {}
    for k in (None, 2):
        with Session(pkg, backend="numpy", top_k=k, budget="30%", prefetch=True) as s:
            s.generate(IDS[:4], max_new_tokens=6, stop_at_eos=False)
            figures[k] = s.stats()
    assert figures[2]["experts_loaded"] < figures[None]["experts_loaded"]
    assert figures[2]["prefetch_hits"] > 0  # the next layer's router predicted some cells


def test_corrupt_expert_chunk_stops_the_run_naming_it(tmp_path):
    src, _ = _make(tmp_path, "gpt2")
    pkg = tmp_path / "m.sphere"
    spherefmt.save(src, pkg, graticule="2x4")
    with spherefmt.open(pkg) as p:
        depth = p.layer_depth[2]
        key = p.shard_key(1, 2, depth)
    shard = pkg / key
    data = bytearray(shard.read_bytes())
    data[40] ^= 0xFF  # inside the first inner chunk's payload
    shard.write_bytes(bytes(data))
    for budget in (None, "25%"):
        with Session(pkg, backend="numpy", budget=budget) as s:
            with pytest.raises(FormatError, match=rf"expert \(1, 2, {depth}\).*{key}.*checksum"):
                s.logits(IDS)


def test_bad_inputs_are_one_line_errors(model):
    _, _, pkg, _, _, _ = model
    with pytest.raises(UnknownBackendError, match="known: .*numpy"):
        Session(pkg, backend="tpu")
    for bad in ("12x", "-5", "0%", "lots"):
        with pytest.raises(InputError, match="budget"):
            Session(pkg, backend="numpy", budget=bad)
    with Session(pkg, backend="numpy") as s:
        with pytest.raises(InputError, match="outside the vocabulary"):
            s.logits([1, 2, 512])
        with pytest.raises(InputError, match="context is 48"):
            s.logits(np.zeros(49, dtype=np.int64))
        with pytest.raises(InputError, match="empty"):
            s.generate([], 3)
        with pytest.raises(InputError, match="1-D integer"):
            s.logits(np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(InputError):
        Session(pkg, backend="numpy", top_k=0)


def test_parse_budget():
    assert parse_budget(None, 100) is None
    assert parse_budget("25%", 1000) == 250
    assert parse_budget("1KiB", 0) == 1024
    assert parse_budget("2M", 0) == 2 << 20
    assert parse_budget(4096, 0) == 4096


def test_nll_matches_transformers_loss(model):
    arch, src, pkg, _, _, _ = model
    ids = np.random.default_rng(1).integers(0, 512, 100)  # longer than the context: 3 windows
    with Session(pkg, backend="numpy") as s:
        total, n = s.nll(ids)
    hf = transformers.AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.float32).eval()
    ref_total = 0.0
    with torch.no_grad():
        for st in range(0, 99, 48):
            w = torch.tensor(ids[st : st + 49])
            logits = hf(w[None, :-1]).logits[0].double()
            ref_total += float(torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum"))
    assert n == 99
    assert total == pytest.approx(ref_total, rel=1e-5)


# --- CLI -------------------------------------------------------------------------------------
def test_cli_run_and_eval(model, tmp_path, capsys):
    _, _, pkg, vhd, _, gen = model
    ids_file = tmp_path / "ids.npy"
    np.save(ids_file, IDS[:6])
    code, out, err = run_cli(capsys, "run", str(vhd), "--ids", str(ids_file), "-n", "8", "--budget", "25%", "--json",
                          "--backend", "numpy")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["ids"][: len(gen)] == gen[: len(doc["ids"])] and len(doc["ids"]) >= 1
    assert doc["stats"]["peak_device_bytes"] <= doc["stats"]["budget_bytes"]
    np.save(ids_file, IDS)
    code, out, err = run_cli(capsys, "eval", str(pkg), "--ids", str(ids_file), "--json", "--backend", "numpy")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["tokens"] == len(IDS) - 1 and math.isclose(doc["ppl"], math.exp(doc["nll"]))
    code, out, err = run_cli(capsys, "run", str(pkg), "--prompt", "hi", "-n", "3", "--backend", "numpy", "--stats")
    assert code == 0, err  # vocabulary 512 >= 256: byte-level text
    assert "tokens_per_s" in err


@pytest.mark.parametrize("args,message", [
    (["--budget", "12x"], "budget '12x'"),
    (["--budget", "1KiB"], "too small"),
    (["--backend", "tpu"], "unknown backend"),
    (["--top-k", "0"], "top_k"),
])
def test_cli_user_errors_exit_2(model, capsys, args, message):
    _, _, pkg, _, _, _ = model
    code, out, err = run_cli(capsys, "run", str(pkg), "--prompt", "hi", *args)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1


def test_cli_bad_ids_files_exit_2(model, tmp_path, capsys):
    _, _, pkg, _, _, _ = model
    np.save(tmp_path / "big.npy", np.array([1, 2, 9999]))
    np.save(tmp_path / "float.npy", np.array([1.0, 2.0]))
    (tmp_path / "junk.npy").write_bytes(b"\x93NUMPY garbage")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    long = tmp_path / "long.npy"
    np.save(long, np.zeros(60, dtype=np.int64))
    cases = [("eval", "big.npy", "outside the vocabulary"), ("eval", "float.npy", "1-D integer"),
             ("eval", "junk.npy", "not a .npy"), ("eval", "obj.npy", "not a .npy"),
             ("run", "long.npy", "context is 48")]
    for cmd, f, message in cases:
        code, _, err = run_cli(capsys, cmd, str(pkg), "--ids", str(tmp_path / f), "--backend", "numpy")
        assert code == 2 and message in err, (f, err)


def test_cli_backends_json(capsys):
    code, out, _ = run_cli(capsys, "backends", "--json")
    assert code == 0
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["numpy"]["available"] and "torch:cuda" in rows
    assert sum(r["default"] for r in rows.values()) == 1  # the one a run without --backend takes
    if not rows["torch:cuda"]["available"] and "(CPU)" in rows.get("vulkan", {}).get("device", "(CPU)"):
        assert rows["numpy"]["default"]


def test_tokenizer_json_is_used_for_text(tmp_path, capsys):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    src, cfg = _make(tmp_path, "gpt2")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    text = ["the sphere of neurons turns slowly, layer by layer, cell by cell"] * 50
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"]))
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.save(str(src / "tokenizer.json"))
    pkg = tmp_path / "tok.sphere"
    spherefmt.save(src, pkg, graticule="2x4")
    with Session(pkg, backend="numpy") as s:
        ids = s.encode("the sphere of neurons")
        assert ids == tok.encode("the sphere of neurons", add_special_tokens=False).ids
        assert len(ids) < len("the sphere of neurons")  # BPE, not bytes
        assert s.decode(ids) == "the sphere of neurons"
    text_file = tmp_path / "t.txt"
    text_file.write_text("the sphere of neurons turns slowly")
    code, out, err = run_cli(capsys, "eval", str(pkg), "--text", str(text_file), "--json", "--backend", "numpy")
    assert code == 0, err
    assert json.loads(out)["tokens"] == len(tok.encode("the sphere of neurons turns slowly").ids) - 1


def test_expert_rewritten_while_streaming_is_read_fresh(tmp_path):
    src, _ = _make(tmp_path, "gpt2")
    pkg = tmp_path / "m.sphere"
    spherefmt.save(src, pkg, graticule="2x4", codec="none")  # the memory-mapped read path
    with Session(pkg, backend="numpy", budget="25%") as s:
        before = s.logits(IDS)
        with spherefmt.open(pkg, "r+") as p:
            depth = p.layer_depth[1]
            e = p.expert(0, 1, depth)
            p.write_expert(0, 1, depth, e.neurons * 3)  # padding stays zero
        after = s.logits(IDS)  # the streamed blocks were evicted: they are read again
        st = s.stats()
        fused = s.model.fused_ffn
    with Session(pkg, backend="numpy", fused_ffn=fused) as fresh:  # the same plan: the same sums
        want = fresh.logits(IDS)
    assert st["blocks_evicted"] > 0
    assert not np.allclose(before, after)
    np.testing.assert_array_equal(after, want)


def test_cache_keeps_a_stable_set_when_a_cycle_does_not_fit():
    """Belady-style eviction on a cyclic scan: with room for k of n equal blocks, each cycle
    after the first hits at least k - 1 blocks (LRU would hit none) and at most k."""
    from spherefmt.runtime.cache import WeightCache

    be = get_backend("numpy")
    n, k, size = 10, 4, 1000
    loads = []

    def load(key):
        loads.append(key)
        return {"w": np.full(size // 4, key[1], np.float32)}

    cache = WeightCache(be, load, lambda key: size, lambda key: key[1], period=n, capacity=k * size,
                        prefetch=False)
    for _ in range(5):
        for pos in range(n):
            cache.set_position(pos)
            with cache.use(("b", pos)) as t:
                assert t["w"][0] == pos
    assert cache.used <= k * size
    cycles_after_first = loads[n:]
    assert 4 * (n - k) <= len(cycles_after_first) <= 4 * (n - (k - 1))
    cache.close()
    assert be.memory_used() == 0 or cache.used == 0


def test_a_block_being_loaded_is_never_evicted_before_its_user_holds_it():
    """The moment after a load lands and before the loading thread takes the cache's lock back,
    another thread making room (a prefetch) must not evict that block: the user would get an
    empty one (seen once as ``KeyError: 'table'`` in a 25% vulkan run)."""
    import threading

    from spherefmt.runtime.cache import WeightCache

    be = get_backend("numpy")

    class Racing(WeightCache):
        def _fill(self, b):
            super()._fill(b)  # ready now; the loading thread has not taken the lock back yet
            t = threading.Thread(target=lambda: self._locked_make_room())
            t.start()
            t.join()

        def _locked_make_room(self):
            with self._cond:
                self._make_room(self.capacity, None)  # room for everything: evicts what it may

    cache = Racing(be, lambda key: {"w": np.full(4, key[1], np.float32)}, lambda key: 16, lambda key: key[1],
                   period=3, capacity=64, prefetch=False)
    for pos in range(3):
        cache.set_position(pos)
        with cache.use(("b", pos)) as t:
            assert t["w"][0] == pos
    cache.close()


def test_vulkan_f16_weights_halve_device_memory(model):
    try:
        get_backend("vulkan:f16")
    except (BackendUnavailableError, UnknownBackendError) as e:
        pytest.skip(str(e))
    _, _, pkg, _, ref, _ = model
    with Session(pkg, backend="vulkan") as s:
        s.logits(IDS)
        f32_peak = s.stats()["peak_device_bytes"]
    with Session(pkg, backend="vulkan:f16") as s:
        out = s.logits(IDS)
        f16_peak = s.stats()["peak_device_bytes"]
    assert f16_peak < 0.6 * f32_peak
    np.testing.assert_allclose(out, ref, atol=2e-2 * np.abs(ref).max(), rtol=0)
    assert (out.argmax(axis=1) == ref.argmax(axis=1)).mean() > 0.9


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_weights_are_held_as_stored_under_a_budget(tmp_path, backend):
    """A bfloat16 package under a budget holds its weight matrices as bfloat16 (half the bytes
    of float32, so twice the weights fit), ``--budget 25%`` is a quarter of the weights as
    stored, and the logits are still transformers' float32 logits of the stored values."""
    cfg = llama_config(num_hidden_layers=5, hidden_size=128, intermediate_size=344, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=512)
    cfg["max_position_embeddings"] = 48
    sd = make_llama(cfg, "BF16", seed=3)
    _perturb_norms(sd, 5)
    src = tmp_path / "hf"
    save_hf_folder(src, sd, cfg)
    pkg = spherefmt.save(src, tmp_path / "m.sphere", graticule="2x4")
    hf = transformers.AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor(IDS)[None]).logits[0].numpy()
    with Session(pkg, backend=backend) as s:
        np.testing.assert_allclose(s.logits(IDS), ref, atol=1e-4, rtol=0)
        resident = s.stats()
    with Session(pkg, backend=backend, budget="25%", weights="stored") as s:
        out = s.logits(IDS)
        st = s.stats()
    with Session(pkg, backend=backend, budget="25%", weights="float32") as s:
        wide = s.logits(IDS)
        assert s.stats()["weight_formats"] == ["F32"] and s.weight_bytes > 1.9 * st["weight_bytes"]
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(wide, out, atol=1e-5, rtol=0)  # the same values, summed in pieces
    assert st["weight_formats"] == ["BF16", "F32"] and st["weight_bytes"] == st["stored_bytes"]
    assert st["budget_bytes"] == st["stored_bytes"] // 4
    assert st["peak_device_bytes"] <= st["budget_bytes"]
    be = get_backend(backend)
    if "BF16" in (be.fast_formats or be.weight_formats):  # GPUs: held as stored by default
        assert resident["weight_formats"] == ["BF16", "F32"]
    else:  # CPUs: widened once at load, products at float32 speed
        assert resident["weight_formats"] == ["F32"] and resident["weight_bytes"] > 1.9 * st["weight_bytes"]
    with pytest.raises(InputError, match="weights 'half'"):
        Session(pkg, backend=backend, weights="half")
