"""`layerboost export`: write a hybrid for other engines."""

from __future__ import annotations

from ..export_gguf import DECI_SWA, LLAMA_ARCHS
from ..targets import FORMATS
from ..util import DTYPES
from .options import dtype_arg


GGUF_ONLY_TYPES = ("q8_0",)


def gguf_dtype_arg(value: str) -> str:
    """--dtype of export: the torch dtype names and aliases, f32/f16 (GGUF's names) and q8_0."""
    value = {"f32": "float32", "f16": "float16"}.get(value, value)
    return value if value in GGUF_ONLY_TYPES else dtype_arg(value)


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a hybrid in a format other engines load without layerboost",
                       description="transformers: softmax + swa plans (one window) as a native class with "
                       "config.layer_types (Llama/Mistral -> Ministral, Qwen2/Qwen3 keep theirs). deci: softmax + none "
                       "plans in the DeciLM / Nemotron-NAS block_configs format (vLLM, SGLang, TensorRT-LLM, mlx-lm). "
                       "gguf: one llama.cpp file, any plan of softmax, swa and none (softmax + swa + none needs the "
                       "patched llama.cpp of engines/llama.cpp/build.sh; a stock one refuses the file). "
                       "Plans a format cannot hold exactly are refused before anything is written.")
    p.add_argument("--model", required=True, help="a saved hybrid folder (layerboost convert / heal output)")
    p.add_argument("--format", required=True, choices=list(FORMATS), help="output format")
    p.add_argument("--out", required=True, help="new output folder (must not exist, or be empty); for gguf a new "
                   "file name ending in .gguf (--force to replace one)")
    p.add_argument("--dtype", type=gguf_dtype_arg, default="float32", choices=list(DTYPES) + list(GGUF_ONLY_TYPES),
                   help="weights dtype written (fp32/f32, bf16, fp16/f16 are accepted too); gguf also takes q8_0")
    p.add_argument("--gguf-arch", choices=list(LLAMA_ARCHS), default=None,
                   help="gguf: the llama.cpp architecture (default: chosen from the plan: llama for softmax only, "
                   f"deci for softmax + none, granite_swa for softmax + swa, {DECI_SWA} for all three, which only "
                   "the patched llama.cpp runs)")
    p.add_argument("--tokenizer-pre", default=None, metavar="NAME",
                   help="gguf: llama.cpp's pre-tokenizer name for a tokenizer layerboost does not recognise")
    p.add_argument("--force", action="store_true",
                   help="replace an existing file, or write into a folder that other commands or files own")
    p.set_defaults(func=run, writes=lambda args: "unmarked file" if args.format == "gguf" else "folder")


def run(args) -> int:
    from ..export import ExportError, export

    dtype = args.dtype if args.dtype in GGUF_ONLY_TYPES else DTYPES[args.dtype]
    try:
        out = export(args.model, args.out, format=args.format, dtype=dtype, gguf_arch=args.gguf_arch,
                     tokenizer_pre=args.tokenizer_pre, overwrite=args.force)
    except ExportError as e:  # every problem found, on the one `error:` line
        raise ExportError("; ".join(line.strip() for line in str(e).splitlines() if line.strip())) from None
    print(f"wrote {out} ({args.format} format)")
    if args.format == "gguf":
        from ..export_gguf import describe

        print(describe(out))
    return 0
