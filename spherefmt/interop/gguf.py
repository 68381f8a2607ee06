"""GGUF (llama.cpp, Ollama, LM Studio) in and out, through the ``gguf`` package's own reader and
writer (``spec/FORMAT.md`` section 9.1).

Import: F32, F16 and BF16 tensors become ordinary tensors under their GGUF names; a
Llama-family GGUF (``blk.N.ffn_gate/ffn_up/ffn_down.weight``) puts its FFN neurons on the sphere
like a Hugging Face checkpoint.  Every other tensor type (quantized blocks such as Q8_0 or Q4_K,
and integer tensors) is carried bit for bit as raw bytes in ``core/``, except quantized FFN
tensors: their values (gguf's dequantizer) go onto the sphere, which is then quantized again
(:attr:`GGUFSource.sphere_quantize`: ``Q4_K`` when the gate and up matrices hold 4.5 bits a value
or fewer, else ``Q8_0``).  A neuron's blocks along ``ffn_gate``/``ffn_up`` are its own rows, so
``Q8_0`` ones come back the same bytes; ``ffn_down``'s blocks run along the neuron axis and are
quantized again per neuron: the conversion measures that loss and records it in the package
metadata (``spherefmt.requantized``).  The GGUF key/value metadata (types included), the tensor
order and types, and the alignment go into the side file ``gguf.json``.

Export: the same key/value pairs in the same order, the same tensors with the same types and
bytes, written tensor by tensor (one in memory at a time); FFN tensors that went onto a quantized
sphere are written in the sphere's type where their rows are whole blocks of it (else ``Q8_0``,
else F32).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from spherefmt.constants import GGUF_SIDE_FILE, MAX_NDIM, QUANT_Q4_K, QUANT_Q8_0, QUANT_TYPES
from spherefmt.dtypes import TensorInfo, numpy_view
from spherefmt.errors import BackendUnavailableError, FormatError, InputError
from spherefmt.format.quant import quantize_rows
from spherefmt.interop.base import TensorSource, written_in_place

if TYPE_CHECKING:
    from spherefmt.format.package import Package

__all__ = ["GGUF_SIDE_FILE", "GGUFSource", "check_gguf_header", "export_gguf", "hf_state_dict", "open_gguf",
           "read_side_file"]

_FLOAT = {"F32": ("F32", np.float32), "F16": ("F16", np.float16), "BF16": ("BF16", np.uint16)}
_MIN_FILE = 24  # magic, version, tensor count, kv count
#: llama.cpp's FFN tensor names, dense and MoE (stacked experts, Qwen2-MoE's shared expert)
_FFN_NAME = re.compile(r"^blk\.\d+\.ffn_(gate|up|down)(_exps|_shexp)?\.weight$")


#: GGUF value types: fixed item sizes (8: string, 9: array are variable)
_GGUF_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_MAX_NESTING = 4


def check_gguf_header(data: bytes | memoryview | mmap.mmap, where: str) -> None:
    """Walk a GGUF header (key/values and tensor infos) checking every count, length and
    offset against the bytes that are there, before the ``gguf`` reader allocates anything for
    them: a count of 2^31 in a small file is refused at once instead of read for minutes.

    Raises
    ------
    FormatError
        Naming the first field that does not fit in the file.
    """
    size = len(data)
    pos = 0

    def take(n: int, what: str) -> int:
        nonlocal pos
        if n < 0 or pos + n > size:
            raise FormatError(f"{where}: malformed GGUF ({what} at byte {pos} runs past the end of the "
                              f"{size}-byte file)")
        start = pos
        pos += n
        return start

    def u32(what: str) -> int:
        return int(struct.unpack_from("<I", data, take(4, what))[0])

    def u64(what: str) -> int:
        return int(struct.unpack_from("<Q", data, take(8, what))[0])

    def string(what: str) -> None:
        take(u64(f"{what} length"), what)

    def value(vtype: int, what: str, depth: int) -> None:
        if vtype in _GGUF_FIXED:
            take(_GGUF_FIXED[vtype], what)
        elif vtype == 8:
            string(what)
        elif vtype == 9:
            if depth >= _GGUF_MAX_NESTING:
                raise FormatError(f"{where}: malformed GGUF ({what}: arrays nested deeper than {_GGUF_MAX_NESTING})")
            item, count = u32(f"{what} item type"), u64(f"{what} count")
            smallest = _GGUF_FIXED.get(item, 8 if item in (8, 9) else 0)
            if smallest == 0:
                raise FormatError(f"{where}: malformed GGUF ({what}: unknown item type {item})")
            if count * smallest > size - pos:
                raise FormatError(f"{where}: malformed GGUF ({what}: {count} items cannot fit in the "
                                  f"{size - pos} bytes left)")
            if item in _GGUF_FIXED:
                take(count * smallest, what)
            else:
                for _ in range(count):
                    value(item, what, depth + 1)
        else:
            raise FormatError(f"{where}: malformed GGUF ({what}: unknown value type {vtype})")

    if size < _MIN_FILE or bytes(data[:4]) != b"GGUF":
        raise FormatError(f"{where}: not a GGUF file (no GGUF magic)")
    take(4, "magic")
    version = u32("version")
    if version not in (2, 3):
        raise FormatError(f"{where}: GGUF version {version} is not supported (2 or 3)")
    n_tensors, n_kv = u64("tensor count"), u64("key/value count")
    if n_kv * 12 > size - pos or n_tensors * 24 > size - pos:
        raise FormatError(f"{where}: malformed GGUF ({n_kv} key/values and {n_tensors} tensors cannot fit in "
                          f"a {size}-byte file)")
    for i in range(n_kv):
        string(f"key {i}")
        value(u32(f"key {i} type"), f"value {i}", 0)
    for i in range(n_tensors):
        string(f"tensor {i} name")
        n_dims = u32(f"tensor {i} dimensions")
        if n_dims > MAX_NDIM:
            raise FormatError(f"{where}: malformed GGUF (tensor {i} has {n_dims} dimensions)")
        take(8 * n_dims + 4 + 8, f"tensor {i} info")


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise BackendUnavailableError("GGUF needs the gguf package: pip install 'spherefmt[gguf]'") from None
    return gguf


def _value(field: Any, gguf: Any, where: str) -> dict[str, Any]:
    """One key/value field as JSON: ``{"key", "type", "value"}`` (+ ``"item_type"`` for arrays);
    strings that are not UTF-8 are kept as ``{"hex": ...}``."""
    vt = gguf.GGUFValueType
    types = list(field.types)
    if not types:
        raise FormatError(f"{where}: metadata {field.name[:80]!r} has no type")

    def scalar(part: Any, t: Any) -> Any:
        if t == vt.STRING:
            raw = bytes(part.tobytes())
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                return {"hex": raw.hex()}
        v = part.tolist()
        v = v[0] if isinstance(v, list) else v
        return bool(v) if t == vt.BOOL else v

    out: dict[str, Any] = {"key": field.name, "type": int(types[0])}
    if types[0] == vt.ARRAY:
        if len(types) != 2 or types[1] == vt.ARRAY:
            raise FormatError(f"{where}: metadata {field.name[:80]!r}: nested arrays are not supported")
        out["item_type"] = int(types[1])
        out["value"] = [scalar(field.parts[i], types[1]) for i in field.data]
    else:
        out["value"] = scalar(field.parts[field.data[0]], types[0])
    return out


def _config(fields: dict[str, Any], n_vocab: int | None) -> dict[str, Any] | None:
    """A Hugging Face-style config from the GGUF keys, so architecture detection can check the
    tensors against it; ``None`` for architectures without one."""
    arch = fields.get("general.architecture")
    if not isinstance(arch, str):
        return None
    keys = {"num_hidden_layers": "block_count", "hidden_size": "embedding_length",
            "intermediate_size": "feed_forward_length", "num_attention_heads": "attention.head_count",
            "num_key_value_heads": "attention.head_count_kv", "max_position_embeddings": "context_length",
            "rms_norm_eps": "attention.layer_norm_rms_epsilon", "rope_theta": "rope.freq_base",
            "num_local_experts": "expert_count", "num_experts_per_tok": "expert_used_count"}
    cfg: dict[str, Any] = {"model_type": arch, "source_format": "gguf"}
    for name, key in keys.items():
        v = fields.get(f"{arch}.{key}")
        if isinstance(v, int | float) and not isinstance(v, bool):
            cfg[name] = v
    if n_vocab:
        cfg["vocab_size"] = n_vocab
    return cfg


def block_size(kind: str) -> tuple[int, int] | None:
    """``(values, bytes)`` per block of a GGUF type gguf's numpy dequantizer reads, else ``None``."""
    gguf = _gguf()
    qt = getattr(gguf.GGMLQuantizationType, kind, None)
    cls = getattr(gguf.quants, kind, None)
    if qt is None or qt not in gguf.GGML_QUANT_SIZES or cls is None or "dequantize_blocks" not in vars(cls):
        return None
    values, size = gguf.GGML_QUANT_SIZES[qt]
    return int(values), int(size)


def dequantize_raw(data: np.ndarray, kind: str, shape: tuple[int, ...]) -> np.ndarray:
    """float32 values ``shape`` of a raw GGUF tensor's bytes (rows of whole blocks of ``kind``),
    by gguf's dequantizer."""
    gguf = _gguf()
    rows = np.ascontiguousarray(data).reshape(math.prod(shape[:-1]), -1)
    values = gguf.quants.dequantize(rows, gguf.GGMLQuantizationType[kind])
    return np.ascontiguousarray(values, dtype=np.float32).reshape(shape)


class GGUFSource(TensorSource):
    """A ``.gguf`` file as a conversion source (memory-mapped: one tensor read at a time)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        gguf = _gguf()
        self.where = str(path)
        p = Path(path)
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(4)
            if size < _MIN_FILE or head != b"GGUF":
                raise FormatError(f"{p}: not a GGUF file (no GGUF magic)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                check_gguf_header(mm, str(p))
        try:
            reader = gguf.GGUFReader(p, "r")
            meta = [_value(f, gguf, self.where) for name, f in reader.fields.items() if not name.startswith("GGUF.")]
            tensors = list(reader.tensors)
        except FormatError:
            raise
        except Exception as e:  # noqa: BLE001 - the gguf reader raises whatever its parse hits
            msg = " ".join(str(e).split())[:160] or type(e).__name__
            raise FormatError(f"{p}: malformed GGUF ({type(e).__name__}: {msg})") from None
        self._reader = reader
        self._tensors: dict[str, Any] = {}
        self._info: dict[str, TensorInfo] = {}
        entries = []
        for t in tensors:
            name = str(t.name)
            if not name or name in self._tensors:
                raise FormatError(f"{p}: empty or duplicate tensor name {name[:80]!r}")
            ne = [int(x) for x in t.shape]
            kind = gguf.GGMLQuantizationType(t.tensor_type).name
            if kind in _FLOAT:
                dtype, shape = _FLOAT[kind][0], tuple(reversed(ne))
                raw = False
            else:  # quantized blocks and integer tensors: raw bytes, restored exactly on export
                dtype, shape, raw = "U8", (int(t.n_bytes),), True
            info = TensorInfo(name, dtype, shape)
            if info.nbytes != int(t.n_bytes) or int(t.data.nbytes) != int(t.n_bytes):
                raise FormatError(f"{p}: tensor {name[:80]!r} ({kind}, ne {ne}) has {int(t.data.nbytes)} bytes in the "
                                  f"file, expected {int(t.n_bytes)}")
            self._tensors[name] = t
            self._info[name] = info
            entries.append({"name": name, "ggml_type": int(t.tensor_type), "type_name": kind, "ne": ne, "raw": raw})
        values = {m["key"]: m["value"] for m in meta}
        align = values.get("general.alignment", 32)
        embd = self._info.get("token_embd.weight")
        tokens = values.get("tokenizer.ggml.tokens")
        n_vocab = len(tokens) if isinstance(tokens, list) else (embd.shape[0] if embd and embd.dtype != "U8" else None)
        self.config = _config(values, n_vocab)
        self._dequantize: dict[str, str] = {}
        #: the block type the sphere is quantized in when the FFN tensors are quantized blocks
        self.sphere_quantize: str | None = self._quantized_ffn(entries, gguf)
        self.metadata = {}
        side = {"version": int(reader.fields["GGUF.version"].parts[-1][0]) if "GGUF.version" in reader.fields else 3,
                "alignment": int(align) if isinstance(align, int) else 32, "kv": meta, "tensors": entries}
        self.files = {GGUF_SIDE_FILE: json.dumps(side, ensure_ascii=False).encode("utf-8")}

    def _quantized_ffn(self, entries: list[dict[str, Any]], gguf: Any) -> str | None:
        """When the FFN tensors are quantized blocks gguf can dequantize: present them as float32
        values (their entries no longer raw, marked ``dequantized``) and name the sphere's type."""
        from spherefmt.format.arch import LLAMA_MODEL_TYPES  # noqa: PLC0415 (format imports interop lazily)

        arch = str((self.config or {}).get("model_type", ""))
        if arch not in LLAMA_MODEL_TYPES:  # no sphere for it: every quantized tensor stays raw
            return None
        ffn = [e for e in entries if _FFN_NAME.match(e["name"])]
        blocks = [e for e in ffn if e["raw"]]
        sizes = [block_size(e["type_name"]) for e in blocks]
        if not blocks or any(sz is None or len(e["ne"]) not in (2, 3) for e, sz in zip(blocks, sizes, strict=True)):
            return None  # integer or unknown types: carried raw, the model stays generic
        small = False
        for e, (values, size) in zip(blocks, sizes, strict=True):  # type: ignore[misc]
            if "_down" not in e["name"] and size * 8 / values <= 4.5:
                small = True
            name = e["name"]
            self._info[name] = TensorInfo(name, "F32", tuple(reversed(e["ne"])))
            self._dequantize[name] = e["type_name"]
            e["raw"], e["dequantized"] = False, True
        return QUANT_Q4_K if small else QUANT_Q8_0

    def keys(self) -> list[str]:
        return list(self._tensors)

    def info(self, name: str) -> TensorInfo:
        return self._info[name]

    def _bytes(self, name: str) -> np.ndarray:
        data = np.asarray(self._tensors[name].data).reshape(-1)
        return data if data.dtype == np.uint8 else data.view(np.uint8)

    def read(self, name: str) -> np.ndarray:
        info = self._info[name]
        if name in self._dequantize:  # quantized FFN blocks: their values, as gguf reads them
            return dequantize_raw(np.asarray(self._tensors[name].data), self._dequantize[name], info.shape)
        flat = self._bytes(name)
        if info.dtype == "U8":
            return flat.copy()
        return flat.view(_FLOAT[info.dtype][1]).reshape(info.shape).copy()

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        info = self._info[name]
        if name in self._dequantize:
            return self.read(name)[start:stop]
        if info.dtype == "U8":
            return self._bytes(name)[start:stop].copy()
        item = np.dtype(_FLOAT[info.dtype][1])
        row = int(np.prod(info.shape[1:], dtype=np.int64)) * item.itemsize
        part = self._bytes(name)[start * row : stop * row]
        return part.view(item).reshape((stop - start, *info.shape[1:])).copy()

    def close(self) -> None:
        self._tensors.clear()
        self._reader = None


def open_gguf(path: Path) -> GGUFSource:
    """A ``.gguf`` file as a source."""
    return GGUFSource(path)


def read_side_file(pkg: Package) -> dict[str, Any]:
    """The package's ``GGUF_SIDE_FILE`` (section 9.1), its ``kv`` and ``tensors`` lists checked;
    malformed: one-line :class:`FormatError`."""
    try:
        side = json.loads(pkg.file(GGUF_SIDE_FILE).decode("utf-8"))
        if not isinstance(side.get("kv"), list) or not all(isinstance(e.get("name"), str) for e in side["tensors"]):
            raise TypeError("kv or tensors malformed")
        return side
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise FormatError(f"{pkg.where}: {GGUF_SIDE_FILE} is malformed ({type(e).__name__})") from None


def hf_state_dict(pkg: Package) -> dict[str, np.ndarray]:
    """A package converted from a llama GGUF as a ``transformers`` Llama (or, with experts,
    Mixtral: joined ``block_sparse_moe.experts.*_proj`` tensors) state dict (numpy, the package's
    dtypes; raw GGUF blocks as their float32 values by gguf's dequantizer): llama.cpp's names
    mapped back, ``attn_q``/``attn_k`` permuted back.  What transformers' model cannot hold
    (``rope_freqs.weight``) is refused by name."""
    from spherefmt.interop.llamacpp import HF_LAYER, HF_TOP, unpermute

    cfg = dict(pkg.config or {})
    heads = int(cfg.get("num_attention_heads") or 0)
    kv = int(cfg.get("num_key_value_heads") or heads)
    raw = {e["name"]: e for e in read_side_file(pkg)["tensors"] if e.get("raw")}
    top = {v: k for k, v in HF_TOP.items()}
    per = {v: k for k, v in HF_LAYER.items()}
    experts = pkg.header.experts is not None
    if experts:  # joined experts (spec 9.1) in the joined form transformers' stacking starts from
        per.update({f"ffn_{p}.weight": f"block_sparse_moe.experts.{p}_proj.weight" for p in ("gate", "up", "down")})
    else:
        per.pop("ffn_gate_inp.weight")
    out = {}
    for name in pkg.keys():
        parts = name.split(".")
        if name in top:
            hf = top[name]
        elif len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and ".".join(parts[2:]) in per:
            hf = f"model.layers.{parts[1]}.{per['.'.join(parts[2:])]}"
        else:
            raise FormatError(f"{pkg.where}: GGUF tensor {name!r} has no place in a transformers Llama model")
        if name in raw:
            e = raw[name]
            shape = tuple(int(x) for x in reversed(e["ne"]))
            a = dequantize_raw(np.asarray(pkg.stored(name)), str(e["type_name"]), shape)
        else:
            a = numpy_view(np.asarray(pkg.stored(name, padded=True)), pkg.tensor_info(name, padded=True).dtype)
        if hf.endswith("q_proj.weight"):
            a = unpermute(a, heads)
        elif hf.endswith("k_proj.weight"):
            a = unpermute(a, kv)
        out[hf] = a
    return out


def export_gguf(pkg: Package, dst: str | os.PathLike[str], storage: Callable[[str], np.ndarray] | None = None,
                progress: Callable[[int], Any] | None = None, quantize: str | None = None) -> None:
    """Write a package converted from GGUF back to a ``.gguf`` (see the module docstring); any
    other Llama-family package as llama.cpp's ``convert_hf_to_gguf.py`` would
    (:mod:`spherefmt.interop.llamacpp`, ``quantize="q8_0"`` for Q8_0 matrices).

    Tensors come from the package as it is now (trained or grown); layer and FFN counts in the
    metadata follow the tensors.  Written beside ``dst`` and renamed into place.
    """
    gguf = _gguf()
    if GGUF_SIDE_FILE not in pkg.header.files:
        from spherefmt.interop.llamacpp import export_llama_cpp

        export_llama_cpp(pkg, dst, storage, progress, quantize=quantize)
        return
    if quantize is not None:
        raise InputError(f"{pkg.where} was converted from GGUF: its export keeps the source's tensor types")
    side = read_side_file(pkg)
    kv, entries = side["kv"], {e["name"]: e for e in side["tensors"]}
    vt, qt = gguf.GGUFValueType, gguf.GGMLQuantizationType
    values = {m["key"]: m for m in kv}
    arch = values.get("general.architecture", {}).get("value", "llama")
    if pkg.graticule is not None and not pkg.header.experts:  # after growth the counts follow the tensors
        for key, v in ((f"{arch}.block_count", len(pkg.layer_depth)), (f"{arch}.feed_forward_length", pkg.ffn_size())):
            if key in values:
                values[key]["value"] = v
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.partial")
    w = gguf.GGUFWriter(tmp, arch=str(arch))
    w.kv_data[0].clear()  # the writer adds general.architecture itself; ours come in their own order
    w.data_alignment = int(side.get("alignment", 32))

    def unpack(v: Any) -> Any:
        return bytes.fromhex(v["hex"]) if isinstance(v, dict) else v

    for m in kv:
        t = vt(int(m["type"]))
        if t == vt.ARRAY:
            w.add_key_value(m["key"], [unpack(x) for x in m["value"]], t, sub_type=vt(int(m["item_type"])))
        else:
            w.add_key_value(m["key"], unpack(m["value"]), t)
    plan = []
    requant: dict[str, str] = {}
    for name in pkg.keys():
        info = pkg.tensor_info(name, padded=True)
        entry = entries.get(name)
        if entry is not None and entry["raw"]:
            kind = qt(int(entry["ggml_type"]))
            byte_shape = gguf.quant_shape_to_byte_shape(tuple(reversed(entry["ne"])), kind)
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), info.nbytes, raw_dtype=kind)
        elif entry is not None and entry.get("dequantized") and info.dtype == "F32":
            # FFN values from quantized blocks: blocks again, in their own type where spherefmt
            # writes it, else the sphere's, else Q8_0 (a Q6_K ffn_down of a Q4_K_M file: Q4_K)
            own = [entry["type_name"]] if entry["type_name"] in QUANT_TYPES else []
            kinds = own + [t for t in (pkg.sphere_type, QUANT_Q8_0) if t is not None]
            fmt = next((t for t in kinds if info.shape[-1] % QUANT_TYPES[t][0] == 0), None)
            if fmt is None:
                w.add_tensor_info(name, info.shape, np.dtype(np.float32), info.nbytes, raw_dtype=qt.F32)
            else:
                requant[name] = fmt
                byte_shape = info.shape[:-1] + (info.shape[-1] // QUANT_TYPES[fmt][0] * QUANT_TYPES[fmt][1],)
                w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw_dtype=qt[fmt])
        else:
            if info.dtype not in _FLOAT:
                raise FormatError(f"{pkg.where}: tensor {name!r} is {info.dtype}; GGUF takes F32, F16 or BF16 here")
            # any non-uint8 dtype keeps the shape as given; raw_dtype sets the GGUF type
            w.add_tensor_info(name, info.shape, np.dtype(np.float32), info.nbytes, raw_dtype=qt[info.dtype])
        plan.append(name)
    with written_in_place(w, tmp, dst):
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for name in plan:
            arr = storage(name) if storage is not None else pkg.stored(name, padded=True)
            if name in requant:
                arr = quantize_rows(np.asarray(arr, dtype=np.float32), requant[name])
            data = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
            w.write_tensor_data(data.reshape(-1))
            if progress is not None:
                progress(data.nbytes)
