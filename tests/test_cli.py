"""The CLI, run as a user runs it (a subprocess), on a tiny model."""
import json
import os
import subprocess
import sys

from conftest import noise_image


def _run(*args, env=None):
    # run from tests/: from the repository root, python -m would put the folder kernels/ on sys.path
    return subprocess.run([sys.executable, "-m", "tokensieve", "run", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300, cwd=os.path.dirname(__file__))


def test_cli_json_two_plans(tiny_path, tmp_path):
    img = tmp_path / "scene.png"
    noise_image(0).save(img)
    out = _run("--model", tiny_path("llava"), "--image", str(img), "--prompt", "what is the colour",
               "--plan", "", "--plan", "fastv:layer=2,keep=8", "--max-new-tokens", "3", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    full, pruned = data["results"]
    assert full["plan"] == "(none)" and full["kept_tokens"] == 64 and pruned["kept_tokens"] == 8
    assert len(pruned["kept"][0]) == 8 and pruned["prefill_flops"] < full["prefill_flops"]


def test_cli_readme_command_on_the_default_model():
    """The README's main command: the shipped tiny LLaVA answers the example scene, full and pruned."""
    scene = os.path.join(os.path.dirname(__file__), "..", "examples", "scene.png")
    out = _run("--image", scene, "--prompt", "what colour is the circle ?")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:4] == ["plan", "answer", "visual_tokens", "kept_tokens"]
    full, pruned = lines[2].split(), lines[3].split()
    assert full[:4] == ["(none)", "red", "64", "64"]
    assert pruned[0].startswith("uniform") and pruned[2:4] == ["64", "16"]


def test_cli_bad_image_is_one_clear_error(tmp_path):
    out = _run("--image", str(tmp_path / "missing.png"), "--prompt", "what")
    assert out.returncode == 2
    assert out.stderr.strip() == f"error: image 0: file not found: {tmp_path / 'missing.png'}"


def test_cli_priority_plan_is_refused_before_the_model_loads(tmp_path):
    """The command line gives no priorities: the plan is refused first (a missing model would be the error
    if it loaded first)."""
    out = _run("--model", str(tmp_path / "no-model"), "--prompt", "what", "--plan", "priority:keep=8")
    assert out.returncode == 2
    assert out.stderr.startswith("error: ") and "priority" in out.stderr and "no-model" not in out.stderr


def test_module_commands_run_from_the_repository_root():
    """``python -m tokensieve...`` from the checkout's root (as the README's commands are typed), where
    ``kernels/`` could shadow the Hugging Face ``kernels`` package that transformers imports."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-m", "tokensieve.eval.shapeworld.heldout", "--help"], capture_output=True,
                         text=True, timeout=300, cwd=root)
    assert out.returncode == 0 and "held-out" in out.stdout, out.stderr[-2000:]
