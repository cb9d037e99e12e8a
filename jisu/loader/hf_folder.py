"""Load a Hugging Face model folder (config.json, *.safetensors, tokenizer files) into a Checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tokenizers import Tokenizer

from jisu.errors import InvalidRequestError, ModelLoadError, UnsupportedModelError
from jisu.loader.checkpoint import Checkpoint, TokenizerSpec
from jisu.loader.gguf import ProgressFn
from jisu.loader.validate import (
    check_complete,
    check_inside_folder,
    check_shape,
    check_tensors_fit_config,
    expected_shapes,
    safetensors_problem,
    weight_file_inside,
)
from jisu.models.arch import for_hf
from jisu.models.config import ModelConfig
from jisu.models.weights import fused_splitter
from jisu.quant.formats import QuantizedTensor, check_outlier_columns

_FLOAT_DTYPES = ("F32", "F16", "BF16")
_INDEX = "model.safetensors.index.json"


def load_hf_folder(path: str | Path, progress: ProgressFn | None = None, keep_blocks: bool = False) -> Checkpoint:
    """keep_blocks: matrices jisu saved quantized (`jisu quantize`) come as QuantizedTensor; otherwise they
    are dequantized to float32 like any float checkpoint.

    The folder is untrusted: config.json values are checked by ModelConfig.from_hf_dict, weight files must lie
    inside the folder, and the tensor shapes the safetensors headers state are checked against the config,
    all before any tensor data is read."""
    folder = Path(path)
    if not folder.is_dir():
        raise ModelLoadError(f"model folder not found: {folder}")
    config_path = folder / "config.json"
    config_dict = read_json(config_path, required=True)
    quantization = config_dict.get("quantization_config")
    jisu_quantized = isinstance(quantization, dict) and quantization.get("quant_method") == "jisu"
    if quantization and not jisu_quantized:
        method = quantization.get("quant_method", "unknown") if isinstance(quantization, dict) else "unknown"
        raise UnsupportedModelError(
            f"{folder}: {method}-quantized checkpoints are not supported; use a float16/bfloat16/float32 "
            "folder or a GGUF file"
        )
    # An unsupported architecture or a bad value is the first thing to report.
    config = ModelConfig.from_hf_dict(config_dict, str(config_path))
    arch = for_hf(config.architecture)
    files = _shard_files(folder)
    headers = _read_headers(files, folder)
    split = fused_splitter(config)
    check_tensors_fit_config(config, _sanitized_shapes(arch, split, _stated_shapes(headers)), str(config_path))
    tokenizer = load_hf_tokenizer(folder, config_dict)
    config_dict = dict(config_dict)
    config_dict["bos_token_id"] = tokenizer.bos_token_id
    config_dict["eos_token_id"] = list(tokenizer.eos_token_ids)
    config = ModelConfig.from_hf_dict(config_dict, str(config_path))
    tensors = _load_safetensors(files, headers, progress)
    if jisu_quantized:
        tensors = _assemble_quantized(tensors, keep_blocks, folder)
    tensors = dict(part for name, t in tensors.items() for pair in arch.sanitize(name, t) for part in split(*pair))
    _check_tensors(tensors, config, folder)
    metadata = {"format": "hf", "model_type": config_dict.get("model_type")}
    if jisu_quantized:
        metadata["quantization"] = quantization
    return Checkpoint(config=config, tensors=tensors, tokenizer=tokenizer, source=str(folder), metadata=metadata)


_QUANT_PARTS = (".qweight", ".scales", ".zeros", ".outlier_cols", ".outlier_weights")


def _assemble_quantized(tensors: dict[str, torch.Tensor], keep_blocks: bool, folder: Path) -> dict:
    """`X.qweight` (+ `X.scales`, `X.zeros`, `X.outlier_cols` / `X.outlier_weights`) -> one QuantizedTensor under
    `X.weight` (or its float32 matrix).
    Bits and group size follow from the stored shapes and dtypes (see jisu/quant/formats.py)."""
    out: dict = {}
    for name, t in tensors.items():
        if not name.endswith(_QUANT_PARTS):
            out[name] = t
            continue
        if not name.endswith(".qweight"):
            continue
        prefix = name.removesuffix(".qweight")
        scales, zeros = tensors.get(prefix + ".scales"), tensors.get(prefix + ".zeros")
        bits = {torch.int8: 8, torch.uint8: 4}.get(t.dtype)
        if bits is None or scales is None or t.dim() != 2 or scales.dim() != 2 or (bits == 4) != (zeros is not None):
            raise ModelLoadError(f"{folder}: quantized tensor {prefix} is incomplete or malformed")
        cols = t.shape[1] * (2 if bits == 4 else 1)
        if scales.shape[0] != t.shape[0] or scales.shape[1] == 0 or cols % scales.shape[1]:
            raise ModelLoadError(f"{folder}: {prefix}.scales {tuple(scales.shape)} does not fit {tuple(t.shape)}")
        oc, ow = tensors.get(prefix + ".outlier_cols"), tensors.get(prefix + ".outlier_weights")
        if (oc is None) != (ow is None):
            raise ModelLoadError(f"{folder}: {prefix} has outlier columns or their weights, not both")
        if oc is not None:
            try:
                check_outlier_columns(bits, oc, ow, t.shape[0], cols, prefix)
            except InvalidRequestError as e:
                raise ModelLoadError(f"{folder}: {e}") from None
        q = QuantizedTensor(bits, t, scales.to(torch.float16), None if zeros is None else zeros.to(torch.float16),
                            cols // scales.shape[1], f"int{bits}", oc, ow)
        out[prefix + ".weight"] = q if keep_blocks else q.dequantize()
    return out


# ----------------------------------------------------------------------------- files

# Far above any real config, index or tokenizer file (a 256k-token tokenizer.json is about 35 MB).
MAX_JSON_BYTES = 64 << 20
MAX_TOKENIZER_BYTES = 256 << 20


def read_json(path: Path, required: bool = False) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise ModelLoadError(f"{path.parent}: missing {path.name}")
        return {}
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise ModelLoadError(f"{path} is {size} bytes; jisu reads JSON files of at most {MAX_JSON_BYTES} bytes")
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from None
    except RecursionError:
        raise ModelLoadError(f"{path} is not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} should hold a JSON object, found {type(data).__name__}")
    return data


def _shard_files(folder: Path) -> list[Path]:
    index = folder / _INDEX
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{index} has no weight_map")
        files = [weight_file_inside(folder, name, index) for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{folder}: {index.name} lists shards that are missing: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        other = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
        hint = f" (found {', '.join(other)}; only safetensors weights are supported)" if other else ""
        raise ModelLoadError(f"{folder}: no *.safetensors weight files{hint}")
    for file in files:
        check_inside_folder(folder, file)
    return files


def _open_safetensors(file: Path) -> Any:
    """safe_open, which checks the header (offsets, sizes, dtypes); its refusal explained in plain words."""
    try:
        return safe_open(str(file), framework="pt")
    except OSError as e:
        raise ModelLoadError(f"cannot read {file}: {e.strerror or e}") from None
    except Exception as e:  # safetensors raises SafetensorError for a short or garbled file
        raise ModelLoadError(f"{file} is truncated or corrupt: {safetensors_problem(file) or e}") from None


def _read_headers(files: list[Path], folder: Path) -> dict[str, tuple[Path, str, tuple[int, ...]]]:
    """Tensor name -> (file, safetensors dtype, shape), from the headers alone."""
    headers: dict[str, tuple[Path, str, tuple[int, ...]]] = {}
    for file in files:
        with _open_safetensors(file) as f:
            for name in f.keys():
                if name.endswith("rotary_emb.inv_freq"):
                    continue  # a buffer old checkpoints saved; the model recomputes it
                if name in headers:
                    raise ModelLoadError(f"{folder}: tensor {name} is in both {headers[name][0].name} and {file.name}")
                info = f.get_slice(name)
                dtype = info.get_dtype()
                if dtype not in _FLOAT_DTYPES and not name.endswith((".qweight", ".outlier_cols")):
                    raise UnsupportedModelError(
                        f"{file}: tensor {name} is {dtype}; jisu loads F32, F16 and BF16 (float32, float16, "
                        "bfloat16) safetensors"
                    )
                headers[name] = (file, dtype, tuple(info.get_shape()))
    return headers


def _stated_shapes(headers: dict[str, tuple[Path, str, tuple[int, ...]]]) -> dict[str, tuple[int, ...]]:
    """HF name -> the shape the model sees: a jisu-quantized X.qweight stands for X.weight (int4 packs two
    columns per byte); its scales and outliers are checked when the blocks are assembled."""
    shapes = {}
    for name, (_, dtype, shape) in headers.items():
        if name.endswith(".qweight"):
            cols = shape[1] * 2 if dtype == "U8" and len(shape) == 2 else (shape[1] if len(shape) == 2 else None)
            shapes[name.removesuffix(".qweight") + ".weight"] = (shape[0], cols) if cols is not None else shape
        elif not name.endswith(_QUANT_PARTS):
            shapes[name] = shape
    return shapes


def _sanitized_shapes(arch, split, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The shapes the model will see once the architecture's sanitize hook has renamed, split or transposed the
    checkpoint's tensors and `split` (weights.fused_splitter) has cut a fused projection held whole into its shards
    (run on meta tensors: nothing is read or allocated)."""
    out = {}
    for name, shape in shapes.items():
        for new, t in arch.sanitize(name, torch.empty(shape, device="meta")):
            out.update((part, tuple(u.shape)) for part, u in split(new, t))
    return out


def _load_safetensors(
    files: list[Path], headers: dict[str, tuple[Path, str, tuple[int, ...]]], progress: ProgressFn | None = None
) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for done, file in enumerate(files, 1):
        if progress is not None:
            progress(done, len(files), f"loading {file.name}")
        try:
            with _open_safetensors(file) as f:
                for name in f.keys():
                    if name in headers:
                        tensors[name] = f.get_tensor(name)
        except OSError as e:
            raise ModelLoadError(f"cannot read {file}: {e.strerror or e}") from None
    return tensors


def _check_tensors(tensors: dict[str, torch.Tensor], config: ModelConfig, folder: Path) -> None:
    shapes = expected_shapes(config)
    check_complete(tensors, shapes, str(folder))
    for name in shapes:
        check_shape(name, tuple(tensors[name].shape), shapes, f"{folder}: tensor {name}")


# ----------------------------------------------------------------------------- tokenizer


def load_hf_tokenizer(folder: str | Path, config_dict: dict[str, Any] | None = None) -> TokenizerSpec:
    """TokenizerSpec from tokenizer.json, tokenizer_config.json and the chat template files."""
    folder = Path(folder)
    tok_file = folder / "tokenizer.json"
    if not tok_file.is_file():
        found = [n for n in ("tokenizer.model", "vocab.json") if (folder / n).is_file()]
        hint = f" (found {', '.join(found)}; jisu needs the fast-tokenizer file tokenizer.json)" if found else ""
        raise ModelLoadError(f"{folder}: missing tokenizer.json{hint}")
    size = tok_file.stat().st_size
    if size > MAX_TOKENIZER_BYTES:
        raise ModelLoadError(f"{tok_file} is {size} bytes; jisu reads tokenizer files of at most {MAX_TOKENIZER_BYTES}")
    try:
        tok = Tokenizer.from_file(str(tok_file))
    except Exception as e:  # tokenizers raises a bare Exception for unreadable JSON
        raise ModelLoadError(f"{tok_file} cannot be loaded: {e}") from None
    tok_cfg = read_json(folder / "tokenizer_config.json")
    special_map = read_json(folder / "special_tokens_map.json")
    config_dict = config_dict if config_dict is not None else read_json(folder / "config.json")
    gen_cfg = read_json(folder / "generation_config.json")

    special = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = _token_text(tok_cfg.get(name, special_map.get(name)))
        if value is not None:
            special[name] = value
    bos_id = _id_of(tok, special.get("bos_token"))
    if bos_id is None and "bos_token" not in tok_cfg:
        bos_id = _first_int(config_dict.get("bos_token_id"))
    eos_ids = [_id_of(tok, special.get("eos_token"))]
    eos_ids += _int_list(config_dict.get("eos_token_id")) + _int_list(gen_cfg.get("eos_token_id"))
    eos = tuple(dict.fromkeys(i for i in eos_ids if i is not None))

    add_bos, add_eos = _added_specials(tok, tok_cfg, bos_id, eos[0] if eos else None)
    tok.post_processor = None  # the engine adds BOS/EOS from add_bos_token; encode() must not do it again
    return TokenizerSpec(
        tokenizer=tok,
        bos_token_id=bos_id,
        eos_token_ids=eos,
        add_bos_token=add_bos,
        add_eos_token=add_eos,
        chat_template=_chat_template(folder, tok_cfg),
        special_tokens=special,
    )


def _added_specials(tok: Tokenizer, tok_cfg: dict[str, Any], bos: int | None, eos: int | None) -> tuple[bool, bool]:
    """Whether transformers' tokenizer(text) puts BOS first / EOS last.

    transformers rebuilds the post-processor from add_bos_token/add_eos_token when tokenizer_config.json
    names either; otherwise it uses tokenizer.json's post-processor as is (Llama's TemplateProcessing
    adds <s>, GPT-2/Qwen's adds nothing). So: explicit flags win, else ask the post-processor.
    """
    if "add_bos_token" in tok_cfg or "add_eos_token" in tok_cfg:
        add_bos = bool(tok_cfg.get("add_bos_token", False)) and bos is not None
        add_eos = bool(tok_cfg.get("add_eos_token", False)) and eos is not None
        return add_bos, add_eos
    if tok.post_processor is None:
        return False, False
    probe = "a"
    plain = tok.encode(probe, add_special_tokens=False).ids
    full = tok.encode(probe, add_special_tokens=True).ids
    add_bos = bos is not None and len(full) > len(plain) and full[0] == bos and full[1:1 + len(plain)] == plain
    add_eos = eos is not None and len(full) > len(plain) and full[-1] == eos and full[-1 - len(plain):-1] == plain
    return add_bos, add_eos


def _chat_template(folder: Path, tok_cfg: dict[str, Any]) -> str | None:
    # transformers >= 4.43 saves the template beside tokenizer_config.json, and that file wins.
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = read_json(folder / "chat_template.json").get("chat_template") or tok_cfg.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # a serialized AddedToken
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _id_of(tok: Tokenizer, text: str | None) -> int | None:
    return tok.token_to_id(text) if text is not None else None


def _int_list(value: Any) -> list[int]:
    if isinstance(value, list):
        return [int(v) for v in value if isinstance(v, int)]
    return [value] if isinstance(value, int) else []


def _first_int(value: Any) -> int | None:
    ints = _int_list(value)
    return ints[0] if ints else None
