"""The evaluation's decisions made before a model is loaded: which engine, batch size and beams a checkpoint gets, and
the pre-check of evaluate.sh, which names every problem of a command line at once, the first argument first."""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from internvl_chat.eval.captioner import ChatCaptioner, EngineChoice, EngineError, choose_engine
from internvl_chat.eval.inputs import check_inputs

REPO = Path(__file__).resolve().parents[1]


def config(architecture="InternLM2ForCausalLM", layers=24, hidden=2048, intermediate=8192):
    """What choose_engine reads of an InternVLChatConfig (these defaults: InternVL2-2B's InternLM2-1.8B)."""
    llm = SimpleNamespace(
        architectures=[architecture], num_hidden_layers=layers, hidden_size=hidden, intermediate_size=intermediate
    )
    return SimpleNamespace(llm_config=llm)


INTERNLM2_20B = dict(layers=48, hidden=6144, intermediate=16384)  # InternVL2-26B's LLM: above 20B by the estimate


@pytest.mark.parametrize(
    "model, requested, num_beams, temperature, dynamic, batch_size, expected",
    [
        ({}, "auto", 1, 0.0, True, None, EngineChoice("fast", 32, 1)),
        ({}, "auto", 1, 0.0, True, 8, EngineChoice("fast", 8, 1)),
        ({}, "hf", 1, 0.0, True, None, EngineChoice("hf", 1, 1)),
        ({}, "auto", 5, 0.0, False, None, EngineChoice("hf", 1, 5)),  # beam search: the original's path
        ({}, "auto", 5, 0.0, True, None, EngineChoice("fast", 32, 1)),  # no beams with dynamic tiles
        (INTERNLM2_20B, "auto", 5, 0.0, False, None, EngineChoice("fast", 32, 1)),  # nor above 20B
        ({}, "auto", 1, 0.7, True, None, EngineChoice("hf", 1, 1)),  # sampling: the original's path
        # every InternVL2 size's LLM has decoder steps: the 1B's Qwen2, the 4B's Phi-3, the 40B's and 76B's Llama
        ({"architecture": "Qwen2ForCausalLM"}, "auto", 1, 0.0, True, None, EngineChoice("fast", 32, 1)),
        ({"architecture": "Phi3ForCausalLM"}, "auto", 1, 0.0, True, None, EngineChoice("fast", 32, 1)),
        ({"architecture": "LlamaForCausalLM"}, "auto", 1, 0.0, True, None, EngineChoice("fast", 32, 1)),
        ({"architecture": "MistralForCausalLM"}, "auto", 1, 0.0, True, None, EngineChoice("hf", 1, 1)),
    ],
)
def test_choose_engine(model, requested, num_beams, temperature, dynamic, batch_size, expected):
    assert choose_engine(config(**model), requested, num_beams, temperature, dynamic, batch_size) == expected


@pytest.mark.parametrize(
    "model, num_beams, temperature, reason",
    [
        ({"architecture": "MistralForCausalLM"}, 1, 0.0, "this checkpoint's LLM is MistralForCausalLM"),
        ({}, 1, 0.7, "--temperature 0.7"),
        ({}, 3, 0.0, "--num-beams 3"),
    ],
)
def test_the_fast_engine_is_refused_where_it_does_not_apply(model, num_beams, temperature, reason):
    with pytest.raises(EngineError) as refused:
        choose_engine(config(**model), "fast", num_beams, temperature, False, None)
    message = str(refused.value)
    assert message.startswith("--engine fast needs greedy decoding and an LLM with decoder steps")
    assert reason in message and "\n" not in message


def test_the_original_path_batches_consecutive_runs_with_the_original_generation_config():
    greedy = ChatCaptioner(None, None, "question", 30, 8, batch_size=4)
    assert greedy.batches(None, list(range(3, 13))) == [[3, 4, 5, 6], [7, 8, 9, 10], [11, 12]]
    assert greedy.generation_config == dict(num_beams=1, max_new_tokens=30, min_new_tokens=8, do_sample=False)
    sampled = ChatCaptioner(None, None, "question", 20, 5, num_beams=2, temperature=0.5)
    assert sampled.generation_config == dict(
        num_beams=2, max_new_tokens=20, min_new_tokens=5, do_sample=True, temperature=0.5
    )


def test_every_problem_is_named_checkpoint_first(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no java
    problems = check_inputs(str(tmp_path / "nowhere"), ["coco", "flickr"], data_root=str(tmp_path))
    assert len(problems) == 4, problems
    assert problems[0].startswith(f"checkpoint folder {tmp_path / 'nowhere'} does not exist")
    assert "coco_karpathy_test.json does not exist" in problems[1]
    assert problems[2] == "unknown dataset 'flickr'; choose from coco, flickr30k, nocaps"
    assert "no `java` is on PATH" in problems[3]
    assert len(check_inputs(str(tmp_path / "nowhere"), ["coco"], str(tmp_path), scoring=False)) == 2


def test_missing_pictures_are_counted(tmp_path):
    from internvl_chat.devkit.coco import make_synthetic_coco

    make_synthetic_coco(tmp_path / "data/coco", train_images=1, test_images=3, seed=0)
    pictures = sorted((tmp_path / "data/coco/val2014").glob("*.jpg"))
    pictures[0].unlink()
    problems = check_inputs(str(tmp_path / "nowhere"), ["coco"], str(tmp_path), scoring=False)
    assert problems[1].startswith("1 of the 3 coco test pictures are missing, the first ")
    assert problems[1].split("the first ")[1].startswith(str(tmp_path / "data/coco/val2014" / pictures[0].name))


def test_evaluate_sh_names_every_problem_before_any_process_starts(tmp_path):
    env = {key: value for key, value in os.environ.items() if key not in ("GPUS", "MASTER_PORT")}
    result = subprocess.run(
        ["sh", str(REPO / "evaluate.sh"), "does-not-exist", "caption-coco", "--dynamic"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert lines[0].startswith("evaluate_caption: checkpoint folder does-not-exist does not exist; download it")
    assert lines[1].startswith("evaluate_caption: data/coco/annotations/coco_karpathy_test.json does not exist")
    assert "Traceback" not in result.stderr and "captioning" not in result.stdout  # no process started
    assert not (tmp_path / "results").exists()


def test_the_pre_check_imports_no_torch():
    """evaluate.sh runs it before every evaluation: torch alone takes seconds to import."""
    probe = (
        "import sys\n"
        "import internvl_chat.cli.evaluate_arguments\n"
        "print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
