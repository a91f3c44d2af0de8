"""ModelConfig from every source, the rope_theta rule (DESIGN §2.5), and the presets."""

from __future__ import annotations

import json

import pytest

from mistral7b.config import PRESETS, ModelConfig
from mistral7b.errors import ModelFileError

V01_PARAMS = {  # Mistral-7B-v0.1's params.json as published: no rope_theta
    "dim": 4096, "n_layers": 32, "head_dim": 128, "hidden_dim": 14336, "n_heads": 32,
    "n_kv_heads": 8, "norm_eps": 1e-05, "sliding_window": 4096, "vocab_size": 32000,
}


def _write(tmp_path, name, obj):
    path = tmp_path / name
    path.write_text(json.dumps(obj))
    return path


def test_v01_params_json_without_theta_means_10000(tmp_path):
    cfg = ModelConfig.from_params_json(_write(tmp_path, "params.json", V01_PARAMS))
    assert cfg.rope_theta == 10000.0
    assert cfg.sliding_window == 4096
    assert cfg == PRESETS["mistral-7b-v0.1"]


def test_params_json_without_window_or_theta_means_1e6(tmp_path):
    params = {k: v for k, v in V01_PARAMS.items() if k != "sliding_window"}
    cfg = ModelConfig.from_params_json(_write(tmp_path, "params.json", params))
    assert cfg.rope_theta == 1e6 and cfg.sliding_window is None


def test_params_json_theta_when_present_wins(tmp_path):
    params = dict(V01_PARAMS, rope_theta=12345.0)
    assert ModelConfig.from_params_json(_write(tmp_path, "p.json", params)).rope_theta == 12345.0


def test_hf_config_classic_and_rope_parameters(tmp_path):
    from transformers import MistralConfig

    base = MistralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                         sliding_window=16).to_dict()
    base.pop("rope_parameters", None)
    classic = _write(tmp_path, "classic.json", dict(base, rope_theta=5e5))
    newer = _write(tmp_path, "newer.json",
                   dict(base, rope_parameters={"rope_type": "default", "rope_theta": 7e5}))
    assert ModelConfig.from_hf_config(classic).rope_theta == 5e5
    cfg = ModelConfig.from_hf_config(newer)
    assert cfg.rope_theta == 7e5
    assert (cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.sliding_window) == \
        (64, 4, 2, 16, 16)


def test_hf_config_written_by_transformers_round_trips(tmp_path):
    from transformers import MistralConfig

    hf = MistralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                       num_attention_heads=8, num_key_value_heads=2, vocab_size=100,
                       sliding_window=None, rope_theta=1e6, tie_word_embeddings=True)
    hf.save_pretrained(tmp_path)
    cfg = ModelConfig.from_hf_config(tmp_path / "config.json")
    assert cfg.rope_theta == 1e6 and cfg.sliding_window is None and cfg.tied_embeddings
    assert cfg.n_layers == 3 and cfg.hidden_dim == 96


def test_presets_have_the_published_parameter_count():
    # DESIGN §1: 7,241,732,096 parameters for v0.1/v0.2 (32000 vocab, untied).
    assert PRESETS["mistral-7b-v0.1"].n_params == 7_241_732_096
    assert PRESETS["mistral-7b-v0.2"].n_params == 7_241_732_096
    assert PRESETS["mistral-7b-v0.3"].vocab_size == 32768
    assert PRESETS["mistral-7b-v0.2"].rope_theta == 1e6
    assert PRESETS["mistral-7b-v0.3"].sliding_window is None


def test_gguf_metadata_of_the_default_model():
    from mistral7b.default_model import default_model_path
    from mistral7b.weights import open_checkpoint

    cfg = open_checkpoint(default_model_path()).config
    # SmolLM2-135M: llama architecture, GQA 9/3 heads, 30 layers, tied embeddings (DESIGN §7)
    assert (cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.dim) == (30, 9, 3, 576)
    assert cfg.tied_embeddings and cfg.sliding_window is None and cfg.vocab_size == 49152


@pytest.mark.parametrize("bad", [{"n_heads": 5}, {"dim": "big"}, {"n_kv_heads": 3}])
def test_inconsistent_params_are_reported(tmp_path, bad):
    with pytest.raises(ModelFileError, match="params.json"):
        ModelConfig.from_params_json(_write(tmp_path, "params.json", dict(V01_PARAMS, **bad)))


_TINY = {"dim": 64, "n_layers": 2, "head_dim": 16, "hidden_dim": 96, "n_heads": 4,
         "n_kv_heads": 2, "norm_eps": 1e-6, "vocab_size": 100, "max_seq_len": 256}
# mistral-inference's TransformerArgs: the fields it requires, and how it reads the rest
# (args.py: sliding_window defaults to None; transformer.py: `rope_theta or 1000000.0`).
_MISTRAL_INFERENCE_REQUIRED = ("dim", "n_layers", "head_dim", "hidden_dim", "n_heads",
                               "n_kv_heads", "norm_eps", "vocab_size")


@pytest.mark.parametrize("cfg", [
    PRESETS["mistral-7b-v0.1"],                                       # window, untied
    PRESETS["mistral-7b-v0.3"],                                       # no window, untied
    ModelConfig(**_TINY, rope_theta=1e4, sliding_window=8, tied_embeddings=True),
    ModelConfig(**_TINY, rope_theta=5e5, sliding_window=None, tied_embeddings=True),
], ids=["v0.1", "v0.3", "tiny-window-tied", "tiny-tied"])
def test_to_params_json_reads_back_the_same_config(tmp_path, cfg):
    params = cfg.to_params_json()
    path = _write(tmp_path, "params.json", params)
    assert ModelConfig.from_params_json(path) == cfg
    raw = json.loads(path.read_text())
    assert all(key in raw for key in _MISTRAL_INFERENCE_REQUIRED)
    assert (raw.get("rope_theta") or 1e6) == cfg.rope_theta
    assert raw.get("sliding_window") == cfg.sliding_window
    assert None not in raw.values()  # the one rule: a None field is left out


def test_to_params_json_of_v01_is_the_published_file_made_explicit():
    params = PRESETS["mistral-7b-v0.1"].to_params_json()
    assert params == {**V01_PARAMS, "rope_theta": 10000.0, "max_seq_len": 32768,
                      "tied_embeddings": False}
