"""store.py in-process: the resolver's order, the registry, and `load(NAME)` through it.
(Pulling and the HF cache through the command line: tests/cli/test_cli_models.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_models import hf_mistral, save_hf

import mistral7b
from mistral7b import store
from mistral7b.errors import InputError, ModelFileError


@pytest.fixture
def home(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv(store.HOME_ENV, str(tmp_path / "m7b"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_hf(hf_mistral(seed=7), tmp_path_factory.mktemp("tiny") / "model")


def test_registered_name_loads_the_same_model(home, tiny):
    assert store.register("tiny", tiny) == tiny.resolve()
    hit = store.resolve("tiny")
    assert hit.source == "registered" and hit.path == tiny.resolve()
    by_name, by_path = mistral7b.load("tiny"), mistral7b.load(tiny)
    ids = [1, 5, 9, 3]
    assert by_name.config == by_path.config
    assert (by_name.logits(ids) == by_path.logits(ids)).all()
    saved = json.loads((home / "m7b" / store.REGISTRY_FILE).read_text())
    assert saved["models"]["tiny"]["path"] == str(tiny.resolve())


def test_a_path_beats_a_name(home, tiny, tmp_path, monkeypatch):
    other = save_hf(hf_mistral(seed=8), tmp_path / "other")
    store.register("other", other)
    monkeypatch.chdir(tiny.parent)            # ./model exists here...
    store.register("model", other)            # ...and is also a registered name
    assert store.resolve("model").path.resolve() == tiny.resolve()


def test_not_found_says_how_to_get_it(home):
    with pytest.raises(store.ModelNotFound, match="mistral7b pull mistral-7b-v0.3") as info:
        store.resolve("mistral-7b-v0.3")
    assert isinstance(info.value, ModelFileError)
    assert store.ALIASES["mistral-7b-v0.3"][1][:8] in str(info.value)
    with pytest.raises(store.ModelNotFound, match="mistral7b pull someone/model"):
        mistral7b.load("someone/model")
    for path in (str(home / "nope"), "./relative/nope", Path("someone/model")):
        with pytest.raises(store.ModelNotFound, match="no such file or folder"):
            store.resolve(path)


def test_registered_path_that_went_away(home, tmp_path):
    folder = save_hf(hf_mistral(seed=9), tmp_path / "gone")
    store.register("gone", folder)
    for f in folder.iterdir():
        f.unlink()
    folder.rmdir()
    with pytest.raises(ModelFileError, match="mistral7b rm gone"):
        store.resolve("gone")


def test_unreadable_registry_is_named(home):
    (home / "m7b").mkdir()
    (home / "m7b" / store.REGISTRY_FILE).write_text('{"models": [1, 2]}')
    with pytest.raises(ModelFileError, match="not a model registry"):
        store.resolve("anything")


def test_removal_forgets_a_registration_only(home, tiny):
    store.register("tiny", tiny)
    plan = store.plan_removal("tiny")
    assert "stay" in plan.what and plan.freed_bytes == 0
    plan.run()
    assert "tiny" not in store.read_registry()
    assert (tiny / "config.json").is_file()
    with pytest.raises(InputError, match="outside|not in the model store"):
        store.plan_removal(str(tiny))


def test_aliases_are_pinned_commits():
    for name, (repo, revision) in store.ALIASES.items():
        assert repo.startswith("mistralai/Mistral-7B-"), name
        assert len(revision) == 40 and all(c in "0123456789abcdef" for c in revision), name
    assert store.ALIASES["mistral"] == store.ALIASES["mistral-7b-instruct-v0.3"]


def test_show_details_lists_adapters_beside_the_model(tmp_path):
    from mistral7b.model_info import details

    folder = save_hf(hf_mistral(seed=10), tmp_path / "model")
    (folder / "run-1").mkdir()
    (folder / "run-1" / "adapter_config.json").write_text("{}")     # a PEFT adapter folder
    (folder / "lora.safetensors").write_bytes(b"")                  # a Mistral adapter file
    (folder / "notes").mkdir()
    info = details(folder)
    assert info.adapters == [str(folder / "lora.safetensors"), str(folder / "run-1")]
    assert info.summary.format == "hf" and info.summary.quantization == "F32"
    assert info.config["sliding_window"] == hf_mistral(seed=10).config.sliding_window
    assert info.tokenizer.startswith("none")
