"""The real model end to end: `make run`'s own endpoint config, Gemma 3 270M imported from its
package, the OpenAI SDK through Envoy."""

from __future__ import annotations

import openai
import pytest

from fmapi_cli.dev import DEV_MODEL
from fmapi_cli.system import DEFAULT_ENDPOINTS, ROOT, GenerationSpec, System, SystemOptions

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dev_system(tmp_path_factory):
    from fmapi_generation.modelimport import import_model

    model_dir = import_model(out_root=ROOT / ".fmapi" / "models", name=DEV_MODEL, progress=False)
    s = System(SystemOptions(
        runtime_dir=tmp_path_factory.mktemp("dev-system"), http_port=0,
        endpoints_file=DEFAULT_ENDPOINTS, generation=[GenerationSpec(DEV_MODEL, model_dir)],
    ))
    s.start()
    yield s
    s.stop()


def test_gemma_chats_coherently_through_envoy(dev_system):
    client = openai.OpenAI(base_url=f"{dev_system.base_url}/v1", api_key=dev_system.admin_token,
                           max_retries=0)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    whole = client.chat.completions.create(model=DEV_MODEL, messages=messages, max_tokens=40,
                                           temperature=0)
    answer = whole.choices[0].message.content
    assert "Paris" in answer, answer
    assert whole.choices[0].finish_reason == "stop"
    words = answer.split()
    assert 2 <= len(words) <= 30 and all(w.strip(".,!?'\"*").isascii() for w in words), answer
    streamed = client.chat.completions.create(model=DEV_MODEL, messages=messages, max_tokens=40,
                                              temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == answer
    # The dev config's embeddings endpoint is served beside it.
    emb = client.embeddings.create(model="all-minilm-l6-v2", input="Paris")
    assert len(emb.data[0].embedding) == 384
