"""Constants of the spherefmt package format, mirroring ``spec/FORMAT.md`` section by section.

``tests/test_spec.py`` parses the spec's tables and checks that every value here agrees.
Retired numbers are commented out, never reused.
"""

from __future__ import annotations

# --- 1. Identity ----------------------------------------------------------------------------
FORMAT_NAME = "spherefmt"
FORMAT_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)
#: Key of the root group attribute that holds the package header.
ROOT_ATTR = "spherefmt"

# --- 2. Layout (paths inside the Zarr v3 hierarchy) -----------------------------------------
CORE_GROUP = "core"
SPHERE_GROUP = "sphere"
ROUTER_GROUP = "router"
SHELL_GROUP_FMT = "d{depth}"  # sphere/d<depth>
NEURONS_ARRAY = "neurons"  # sphere/d<depth>/neurons  (layers, P, M, K, F)
INDEX_ARRAY = "index"  # sphere/d<depth>/index    (layers, P, M, K) int32, -1 = padding
PARENT_ARRAY = "parent"  # sphere/d<depth>/parent   (layers, P, M, K) int32, -1 = none
INDEX_DTYPE = "int32"
PADDING_INDEX = -1

# --- 3. Limits ------------------------------------------------------------------------------
MAX_PARALLELS = 180
MAX_MERIDIANS = 360
MAX_DEPTH = 10
EARTH_GRATICULE = (180, 360)
#: A safetensors JSON header larger than this is refused (same bound as the reference reader).
MAX_SAFETENSORS_HEADER = 100_000_000
#: Tensors of more dimensions than this are refused on import.
MAX_NDIM = 16
#: Root header JSON larger than this is refused on open.
MAX_HEADER_JSON = 64_000_000

# --- 4. Data types: name (safetensors spelling) -> (zarr storage dtype, item size) ----------
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("uint16", 2),  # raw bfloat16 words: Zarr v3 has no bfloat16 (zarr-specs #130)
    "F8_E4M3": ("uint8", 1),  # raw float8 bytes
    "F8_E5M2": ("uint8", 1),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U64": ("uint64", 8),
    "U32": ("uint32", 4),
    "U16": ("uint16", 2),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}
#: Floating dtypes whose FFN tensors may be placed on the sphere.
SPHERE_DTYPES = ("F64", "F32", "F16", "BF16")

# --- 5.1 Quantized tensors ------------------------------------------------------------------
#: The quantization types a package may hold (GGUF's ``Q8_0`` and ``Q4_K``), their values per
#: block and bytes per block: ``Q8_0`` a float16 scale then one int8 per value; ``Q4_K`` float16
#: ``d`` and ``dmin``, 12 bytes of 6-bit sub-block scales and mins, then 4 bits per value.
QUANT_Q8_0 = "Q8_0"
Q8_0_BLOCK = 32
Q8_0_BYTES = 34
QUANT_Q4_K = "Q4_K"
Q4_K_BLOCK = 256
Q4_K_BYTES = 144
QUANT_TYPES: dict[str, tuple[int, int]] = {QUANT_Q8_0: (Q8_0_BLOCK, Q8_0_BYTES), QUANT_Q4_K: (Q4_K_BLOCK, Q4_K_BYTES)}
#: Header member listing the quantized tensors.
QUANTIZATION_KEY = "quantization"

# --- 5. Codecs ------------------------------------------------------------------------------
CODEC_DEFAULT = "default"  # bytes -> blosc(zstd, level 1, shuffle, typesize, one block per chunk) -> crc32c
CODEC_NONE = "none"  # bytes -> crc32c
CODEC_PRESETS = (CODEC_DEFAULT, CODEC_NONE)
ZSTD_LEVEL = 1
#: blosc blocks are one chunk, up to this size (c-blosc's limit on a block is below 2 GiB)
BLOSC_MAX_BLOCK = 1 << 30
#: zstd codes its input in blocks of this many bytes, one entropy table per block.
ZSTD_BLOCK = 128 * 1024
#: Default graticules keep each byte plane of a cell-layer chunk at least one zstd block long...
MIN_PLANE_BYTES = 128 * 1024
#: ...and at most this fraction of the chunk in the block where the two planes meet.
MAX_PLANE_WASTE = 0.025
#: Core tensors are chunked along axis 0 to about this many uncompressed bytes.
CORE_CHUNK_BYTES = 4 * 1024 * 1024
#: Conversion writes large core tensors in slabs of this many chunks (bounded memory).
CORE_SLAB_CHUNKS = 4

# --- 6. Architectures and neuron row layouts -------------------------------------------------
ARCH_GPT2 = "gpt2"
ARCH_LLAMA = "llama"
ARCH_GENERIC = "generic"
ARCHITECTURES = (ARCH_GPT2, ARCH_LLAMA, ARCH_GENERIC)
#: field name -> (role, axis of the neuron index in the source tensor)
GPT2_FIELDS = (("w_in", "mlp.c_fc.weight", 1), ("b_in", "mlp.c_fc.bias", 0), ("w_out", "mlp.c_proj.weight", 0))
LLAMA_FIELDS = (
    ("gate", "mlp.gate_proj.weight", 0),
    ("up", "mlp.up_proj.weight", 0),
    ("down", "mlp.down_proj.weight", 1),
)
#: the same fields under llama.cpp's GGUF names (``blk.N.``; section 9.1)
GGUF_LLAMA_FIELDS = (
    ("gate", "ffn_gate.weight", 0),
    ("up", "ffn_up.weight", 0),
    ("down", "ffn_down.weight", 1),
)
#: side file of a package converted from GGUF: key/values, tensor types, alignment (section 9.1)
GGUF_SIDE_FILE = "gguf.json"

# --- 7. Placement ----------------------------------------------------------------------------
PLACEMENT_POLICY = "lightning-pca-balanced"
PLACEMENT_VERSION = 1
PLACEMENT_COACTIVATION = "coactivation-balanced"  # cells from activations on sample text
PLACEMENT_ROUTED = "routed-balanced"  # sphere sparsify: hot neurons always on, the rest by activations
ROUTING_KEY = "routing"  # header member: the always-on cells and how routing was trained (section 7.3)
DEFAULT_BEND = 0.5  # weight of a neuron's own direction against its tree parent's
#: placement version 2 (section 7): layers whose exact tree costs more multiply-adds than this
#: are treed in a projection of TREE_DIMS principal directions, TREE_CANDIDATES rescored exactly
PLACEMENT_VERSION_PROJECTED = 2
TREE_EXACT_MAX_MACS = 2**39
TREE_DIMS = 64
TREE_CANDIDATES = 16
TREE_BASIS_ROWS = 2048

# --- 8. Package states -----------------------------------------------------------------------
STATE_WRITING = "writing"
STATE_COMPLETE = "complete"

# --- 10. Manifest (format version 2) ---------------------------------------------------------
MANIFEST_FORMAT = "spherefmt-manifest"
MANIFEST_VERSION = 1
#: the manifest is ``manifest/zarr.json``; replacing it commits a change
MANIFEST_PREFIX = "manifest"
#: new bytes of existing objects wait at ``staging/<generation>-<id>-<n>`` until moved into place
STAGING_PREFIX = "staging"
#: a manifest file larger than this is refused on open
MAX_MANIFEST_BYTES = 256_000_000
#: a reader beside a writer re-reads a changed package at most this many times per call...
MAX_REREADS = 200
#: ...and for at most this many seconds
MAX_REREAD_SECONDS = 30.0
