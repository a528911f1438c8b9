"""`rwml-jax export`: a run's stage model or checkpoint step as a Hugging Face folder that real `transformers`
loads with the same logits as our forward; tokenizer and chat template round-trip; hub options fail clearly
offline (no network is contacted: HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rwml_jax import sharding
from rwml_jax.cli import main
from rwml_jax.cli_eval import model_folder
from rwml_jax.config import load_config
from rwml_jax.models import decoder, hf_io
from rwml_jax.sampling import tiny
from rwml_jax.train.export import ExportError, export_model
from rwml_jax.train.sft_loop import train_sft
from rwml_jax.train.stage_io import Stage

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

MESSAGES = [{"role": "system", "content": "You are a world model."},
            {"role": "user", "content": "Action: go to desk 1"}]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A demo_cpu run folder whose rwml stage trained 4 SFT steps (checkpoints 2 and 4) from the warm-start
    model and finished: written by the real stage helpers (Stage markers, TrainLoop checkpoints, save_pretrained)."""
    root = tmp_path_factory.mktemp("export")
    work = root / "run"
    cfg = load_config("demo_cpu", [f"--config.work_dir={work}"])
    tok = tiny.tiny_tokenizer(root / "tok")
    config, start = tiny.tiny_model(tok, seed=1)
    hf_io.save_pretrained(config, start, work / "warmstart" / "model", tokenizer=tok)
    stage = Stage(work, "rwml")
    stage.begin(cfg)
    rng = np.random.default_rng(0)
    examples = [(rng.integers(5, 300, 10).tolist(), rng.integers(5, 300, 6).tolist()) for _ in range(8)]
    seen: dict[int, dict] = {}
    final, _ = train_sft(stage_dir=stage.path, mesh=sharding.make_mesh(1, 1, 1), model_config=config,
                         init_params=lambda: start, examples=examples, learning_rate=3e-3, epochs=2, batch_size=4,
                         micro_batch_size=None, warmup_steps=1, seed=0, pad_id=tok.pad_token_id, checkpoint_every=2,
                         keep=3, desc="rwml", on_step=lambda s, st: seen.__setitem__(s, jax.device_get(st.params)))
    hf_io.save_pretrained(config, final, stage.file("model"), tokenizer=tok)
    stage.finish(cfg, summary={"steps": 4, "reward_before": 0.125, "reward_after": 0.5}, outputs=["model/config.json"])
    return work, config, jax.device_get(final), seen, tok


def _ids(vocab: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.random.default_rng(3).integers(3, vocab, (2, 11))
    return ids, np.ones_like(ids)


def _hf_logits(folder: Path, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


def _our_logits(config, params, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.asarray(decoder.forward(config, params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)))


def test_float32_export_loads_in_transformers_with_the_same_logits(run, tmp_path):
    work, config, final, _, tok = run
    out = export_model(work, "rwml", tmp_path / "hf")
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "README.md", "tokenizer.json",
            "tokenizer_config.json"} <= names
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    ids, mask = _ids(config.vocab_size)
    np.testing.assert_allclose(_hf_logits(out, ids, mask), _our_logits(config, final, ids, mask), atol=1e-4, rtol=0)

    # the tokenizer and its chat template round-trip
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "You arrive at desk 1. On the desk 1, you see a mug 2."
    assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    assert hf_tok.decode(hf_tok.encode(text, add_special_tokens=False)) == text
    assert hf_tok.chat_template and hf_tok.chat_template == tok.chat_template
    assert hf_tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == \
        tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    gen = transformers.GenerationConfig.from_pretrained(out)
    assert gen.eos_token_id == tok.eos_token_id and gen.pad_token_id == tok.pad_token_id

    card = (out / "README.md").read_text()
    assert "demo_cpu / rwml" in card and "| reward_after | 0.5 |" in card and "final model" in card


def test_bfloat16_sharded_export_through_the_cli(run, tmp_path, capsys):
    work, config, final, _, _ = run
    out = tmp_path / "bf16"
    # ~50 kB shards: the tiny model's weights need several, with an index
    assert main(["export", str(work), "rwml", str(out), "--dtype", "bfloat16", "--max-shard-gb", "0.00005"]) == 0
    assert f"to {out}" in capsys.readouterr().out
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (out / "model.safetensors").exists()
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    header = json.loads(_safetensors_header(out / sorted(set(index["weight_map"].values()))[0]))
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    # transformers upcasts the bf16 weights to float32 exactly; our forward runs on the same rounded weights,
    # so both compute in float32 from identical numbers: the float32 tolerance holds (1e-4).
    rounded = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16).astype(jnp.float32), final)
    ids, mask = _ids(config.vocab_size)
    hf = _hf_logits(out, ids, mask)
    np.testing.assert_allclose(hf, _our_logits(config, rounded, ids, mask), atol=1e-4, rtol=0)
    assert np.abs(hf - _our_logits(config, final, ids, mask)).max() > 1e-4  # the rounding is really there


def _safetensors_header(path: Path) -> str:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return data[8:8 + n].decode()


def test_checkpoint_step_export_has_that_steps_params(run, tmp_path, capsys):
    work, config, _, seen, _ = run
    assert main(["export", str(work), "rwml@2", str(tmp_path / "s2")]) == 0
    _, params = hf_io.load_pretrained(tmp_path / "s2", dtype="float32")
    flat_ours, flat_ckpt = jax.tree.leaves(params), jax.tree.leaves(seen[2])
    assert len(flat_ours) == len(flat_ckpt)
    for a, b in zip(flat_ours, flat_ckpt, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(flat_ours, jax.tree.leaves(seen[4]), strict=True))
    assert "checkpoint step 2" in (tmp_path / "s2" / "README.md").read_text()

    assert main(["export", str(work), "rwml@3", str(tmp_path / "s3")]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint step 3" in err and "(steps: [2, 4])" in err
    with pytest.raises(ExportError, match="unknown stage 'collect'"):
        export_model(work, "collect", tmp_path / "c")
    with pytest.raises(ExportError, match="has no checkpoints"):
        export_model(work, "wm_sft@1", tmp_path / "c")


def test_a_recipe_name_resolves_its_work_dir(run, tmp_path, capsys):
    work = run[0]
    assert main(["export", "demo_cpu", "rwml", str(tmp_path / "r"), f"--config.work_dir={work}"]) == 0
    assert (tmp_path / "r" / "model.safetensors").exists()
    assert main(["export", "demo_cpu", "rwml", str(tmp_path / "r2"), f"--config.work_dir={tmp_path / 'none'}"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_hub_options_fail_clearly_offline(run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    work = run[0]
    assert main(["export", str(work), "rwml", str(tmp_path / "p"), "--private"]) == 2
    assert "--private needs --push-to-hub" in capsys.readouterr().err
    assert main(["export", str(work), "rwml", str(tmp_path / "p"), "--push-to-hub", "not a repo"]) == 2
    assert "is not a hub repo id" in capsys.readouterr().err
    assert main(["export", str(work), "rwml", str(tmp_path / "p2"), "--push-to-hub", "me/rwml-demo", "--private"]) == 2
    err = capsys.readouterr().err
    assert "HF_HUB_OFFLINE is set" in err and "huggingface-cli upload me/rwml-demo" in err
    assert (tmp_path / "p2" / "model.safetensors").exists()  # the folder is written before the upload


def test_model_options_take_hub_names_and_fail_clearly_offline(run, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["generate", "--model", "nobody/no-such-model", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "'nobody/no-such-model' is neither a local folder nor downloadable" in err
    assert main(["generate", "--model", str(run[0] / "rwml" / "missing"), "--max-new-tokens", "2"]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="--policy 'nobody/no-such-model' is neither a local folder"):
        model_folder("nobody/no-such-model")
    assert model_folder(str(run[0] / "rwml")) == str(run[0] / "rwml" / "model")  # a stage folder still works
