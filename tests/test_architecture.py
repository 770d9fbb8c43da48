"""The structure docs/ARCHITECTURE.md describes, held by the tests: the remote-code folder (internvl_chat/model/) is
the model a checkpoint carries, self-contained and without switches that other code flips; the package installs
with its commands; nothing edits sys.path. (Which package may import which is checked by lint-imports in
tools/test.sh.)"""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = REPO / "internvl_chat/model"
# The remote-code folder is the model a checkpoint carries: every module in it, and nothing else.
REMOTE_CODE = tuple(sorted(path.name for path in MODEL_DIR.glob("*.py") if path.name != "__init__.py"))
# packaging: a dependency of transformers itself (the remote code compares its version)
THIRD_PARTY = {"torch", "transformers", "packaging", "peft", "triton", "sentencepiece", "numpy"}


def imported_modules(path: Path) -> tuple[set[str], set[str]]:
    """(top-level absolute imports, relative imports) of a file."""
    absolute, relative = set(), set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            absolute.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            (relative if node.level else absolute).add(node.module.split(".")[0])
    return absolute, relative


@pytest.mark.parametrize("name", REMOTE_CODE)
def test_remote_code_imports_only_each_other_and_libraries(name):
    import sys

    absolute, relative = imported_modules(MODEL_DIR / name)
    assert relative <= {Path(other).stem for other in REMOTE_CODE}, relative
    assert absolute <= THIRD_PARTY | set(sys.stdlib_module_names), absolute - set(sys.stdlib_module_names)


def test_conversation_needs_no_library():
    """The template is read by data/ as well: it must not pull torch or transformers in."""
    import sys

    absolute, relative = imported_modules(MODEL_DIR / "conversation.py")
    assert not relative and absolute <= set(sys.stdlib_module_names)


@pytest.mark.parametrize("name", REMOTE_CODE)
def test_remote_code_holds_no_module_level_switch(name):
    """No module-level flag (a bool or None assigned at the top level) that code could flip to change what the
    model computes."""
    tree = ast.parse((MODEL_DIR / name).read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Constant):
            assert not isinstance(node.value.value, bool) and node.value.value is not None, ast.unparse(node)


def model_names_bound_in(tree: ast.Module) -> set[str]:
    """The names a file binds to the model modules and classes (`from internvl_chat.model import fused_kernels as
    fk` binds fk)."""
    modules = {Path(name).stem for name in REMOTE_CODE}
    names = {"InternVLChatModel", "InternLM2ForCausalLM", "InternVisionModel", "InternVLChatConfig"}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                if alias.name in modules or node.module.split(".")[-1] in modules and alias.name in names:
                    names.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[-1] in modules and alias.asname:
                    names.add(alias.asname)
    return names


def test_nothing_writes_into_the_model_modules():
    """No file of the repository, tests included, assigns to a name of a model module (`fused_kernels.X = ...`)
    or to a model class's attribute: code selects what the model computes through its public arguments."""
    offenders = []
    for path in [*REPO.glob("internvl_chat/**/*.py"), *REPO.glob("tools/**/*.py"), *REPO.glob("tests/*.py")]:
        if path.parent == MODEL_DIR and path.name in REMOTE_CODE:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        bound = model_names_bound_in(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
                targets = [node.target]
            else:
                continue
            for target in targets:
                if (
                    isinstance(target, ast.Attribute)
                    and isinstance(target.value, ast.Name)
                    and target.value.id in bound
                ):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(target)}")
    assert not offenders, offenders


def test_a_written_checkpoint_carries_exactly_the_remote_code(tmp_path):
    """save_pretrained copies the modeling file and what it imports: the remote-code files, nothing of training."""
    from internvl_chat.devkit.checkpoint import build_checkpoint

    folder = build_checkpoint(tmp_path / "tiny", seed=0)
    assert sorted(path.name for path in folder.glob("*.py")) == sorted(REMOTE_CODE)


def test_the_remote_code_folder_is_what_a_checkpoint_carries():
    assert set(REMOTE_CODE) == {
        "configuration_intern_vit.py",
        "configuration_internlm2.py",
        "configuration_internvl_chat.py",
        "conversation.py",
        "decoder_steps.py",
        "fused_kernels.py",
        "modeling_intern_vit.py",
        "modeling_internlm2.py",
        "modeling_internvl_chat.py",
        "tokenization_internlm2.py",
    }


def test_nothing_edits_sys_path_outside_the_tests_conftest():
    """The package is installed (pip install -e ., tools/setup_env.sh); scripts import it as users would."""
    offenders = []
    for path in [*REPO.glob("internvl_chat/**/*.py"), *REPO.glob("tools/**/*.py"), *REPO.glob("tools/**/*.sh")]:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if "sys.path.insert" in line or "sys.path.append" in line:
                offenders.append(f"{path.relative_to(REPO)}:{number}")
    assert not offenders, offenders


def test_the_image_token_formula_is_written_once():
    """<IMG_CONTEXT> tokens a tile, (tile / patch)^2 x downsample_ratio^2, has one definition (the config's)."""
    writers = [
        str(path.relative_to(REPO))
        for path in [*REPO.glob("internvl_chat/**/*.py"), *REPO.glob("tools/**/*.py")]
        if "downsample_ratio**2" in path.read_text(encoding="utf-8").replace(" ", "")
    ]
    assert writers == ["internvl_chat/model/configuration_internvl_chat.py"]


COMMANDS = (
    "internvl-finetune",
    "internvl-evaluate",
    "internvl-merge-lora",
    "internvl-validate-data",
    "internvl-caption-report",
    "internvl-score-captions",
)


def test_the_package_declares_the_user_commands():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert set(project["scripts"]) == set(COMMANDS)
    for target in project["scripts"].values():
        module, _, function = target.partition(":")
        assert module.startswith("internvl_chat.cli.") and function == "main", target


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_explains_itself(command):
    """The installed console entry points run: --help prints a usage line and exits 0."""
    import shutil
    import subprocess
    import sys

    executable = Path(sys.executable).parent / command
    if not executable.exists():
        executable = Path(shutil.which(command) or executable)
    assert executable.exists(), f"{command} is not installed: pip install -e . (tools/setup_env.sh does it)"
    result = subprocess.run([executable, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout and len(result.stdout.splitlines()) > 3
