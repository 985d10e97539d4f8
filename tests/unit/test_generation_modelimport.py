"""`fmapi models import` from a local Hugging Face directory (the GGUF path runs in the slow
Gemma test of tests/integration/test_generation_service.py)."""

from __future__ import annotations

import json
import shutil

import pytest
from transformers import AutoTokenizer

from fmapi_cli.main import main as fmapi
from fmapi_generation.modelimport import (
    BASE_CHAT_STOP,
    BASE_CHAT_TEMPLATE,
    MARKER,
    ImportFailed,
    import_model,
)
from helpers.tiny_llm import build_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("src") / "tiny")


def test_cli_imports_once_and_prints_the_directory(tiny, tmp_path, capsys):
    out_root = tmp_path / "models"
    assert (
        fmapi(["models", "import", "--hf-dir", str(tiny), "--out-root", str(out_root), "--quiet"])
        == 0
    )
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert out == str(out_root.resolve() / "tiny")
    files = {p.name for p in (out_root / "tiny").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", MARKER} <= files
    weights = out_root / "tiny" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    # Same source: nothing is rewritten.
    assert (
        fmapi(["models", "import", "--hf-dir", str(tiny), "--out-root", str(out_root), "--quiet"])
        == 0
    )
    assert capsys.readouterr().out.strip().splitlines()[-1] == out
    assert weights.stat().st_mtime_ns == before
    # The imported tokenizer still gives exactly one BOS for the model's chat template.
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("hi").input_ids[0] == tok.bos_token_id and tok.chat_template


def test_changed_source_is_imported_again(tiny, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny, src)
    out = import_model(hf_dir=src, name="m", out_root=tmp_path / "models", progress=False)
    marker = json.loads((out / MARKER).read_text())
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "bos_token_id": 1}))
    out2 = import_model(hf_dir=src, name="m", out_root=tmp_path / "models", progress=False)
    assert out2 == out and json.loads((out / MARKER).read_text()) != marker
    assert not list((tmp_path / "models").glob(".m.*")), "temporary directories are cleaned up"


def test_base_model_without_template_gets_one_with_stop_strings(tiny, tmp_path):
    src = tmp_path / "base"
    shutil.copytree(tiny, src)
    (src / "chat_template.jinja").unlink()
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (src / "tokenizer_config.json").write_text(json.dumps(cfg))
    out = import_model(hf_dir=src, out_root=tmp_path / "models", progress=False)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == BASE_CHAT_TEMPLATE
    prompt = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert prompt == "<s>Be brief.\n\nUser: Hi\nAssistant:"
    gc = json.loads((out / "generation_config.json").read_text())
    assert gc["stop_strings"] == BASE_CHAT_STOP


def test_gemma_tokenizer_that_lost_bos_gets_it_back(tiny, tmp_path):
    """What transformers does to Gemma's GGUF tokenizer: BOS defined but not added."""
    from tokenizers import Tokenizer

    src = tmp_path / "gemma-like"
    shutil.copytree(tiny, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "gemma3_text"
    (src / "config.json").write_text(json.dumps(cfg))
    raw = Tokenizer.from_file(str(src / "tokenizer.json"))
    raw.post_processor = None
    raw.save(str(src / "tokenizer.json"))
    tok = AutoTokenizer.from_pretrained(src)
    assert tok("hi").input_ids[0] != tok.bos_token_id  # the broken state
    out = import_model(hf_dir=src, out_root=tmp_path / "models", progress=False)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("hi").input_ids
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


def test_bad_sources_are_refused(tmp_path):
    with pytest.raises(ImportFailed, match="no GGUF file"):
        import_model(gguf=tmp_path / "missing.gguf", out_root=tmp_path)
    with pytest.raises(ImportFailed, match="no config.json"):
        import_model(hf_dir=tmp_path, out_root=tmp_path)
    with pytest.raises(ImportFailed, match="not both"):
        import_model(gguf="a", hf_dir="b", out_root=tmp_path)
