"""The snippets of README.md and of the docs/ site run as written, from where a user trained.

The snippets are read from the pages' fenced code blocks, not copied here: README's quick start
training command (shrunk with overrides appended), the model-loading Python, the scoring server,
the own-config-dir example, and every documented `python -m insect_exp` command's overrides.
Placeholders are filled in: `<run id>`, `<model id>` and `<image file>` (a demo image); `images`
is the user's own in the Python snippet, so the test supplies it when the snippet does not.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from insect_exp.config import register_configs
from tests.conftest import CONF_DIR

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"  # the mkdocs site's pages (mkdocs.yml)
# Appended to the quick start's command: the demo at its smallest, with a model to load.
SHRINK = (
    "experiment=debug",
    "model.image_size=[32,32]",
    "dataset.train_per_class=8",
    "dataset.test_per_class=4",
    "mlflow.log_model=true",
)
IMAGE_SIZE = (32, 32)


def _pages() -> list[Path]:
    """README.md and every Markdown page of the docs site."""
    return [README, *sorted(DOCS.rglob("*.md"))]


def _text() -> str:
    return "\n".join(page.read_text() for page in _pages())


def _headings(text: str) -> list[tuple[int, int, str]]:
    """(offset, level, title) of each Markdown heading outside fenced code blocks."""
    found, offset, fenced = [], 0, False
    for line in text.splitlines(keepends=True):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        match = re.match(r"(#{1,6}) (.+)$", line.rstrip("\n"))
        if match and not fenced:
            found.append((offset, len(match.group(1)), match.group(2).strip()))
        offset += len(line)
    return found


def _section(title: str) -> str:
    """The one section of README or a docs page headed `title`, up to the next heading of its
    level or above (a page's `# title` is the whole page)."""
    sections = []
    for page in _pages():
        text = page.read_text()
        headings = _headings(text)
        for i, (start, level, name) in enumerate(headings):
            if name == title:
                ends = [o for o, lv, _ in headings[i + 1 :] if lv <= level]
                sections.append(text[start : ends[0] if ends else len(text)])
    assert len(sections) == 1, f"{len(sections)} sections headed {title!r}"
    return sections[0]


def _blocks(text: str, language: str) -> list[str]:
    """The fenced code blocks of a language, dedented (blocks inside list items are indented)."""
    pattern = re.compile(r"^( *)```(\w*)\n(.*?)^\1```", re.M | re.S)
    return [textwrap.dedent(m.group(3)) for m in pattern.finditer(text) if m.group(2) == language]


def _env(**extra: str) -> dict[str, str]:
    """The test's environment without a tracking URI: the snippets must not need one set."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {**env, **extra}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """The quick start's training command, run as README says plus SHRINK, in a fresh directory."""
    (block,) = [b for b in _blocks(_section("Quick start"), "bash") if "pip install" in b]
    command = shlex.split(block.strip().split("&&")[-1])
    assert command[:3] == ["python", "-m", "insect_exp"], command

    workdir = tmp_path_factory.mktemp("trained_here")
    data = tmp_path_factory.mktemp("data")
    out = subprocess.run(
        [sys.executable, *command[1:], *SHRINK],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(INSECT_EXP_CACHE_DIR=str(data)),
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run_id = re.search(r"^MLflow run id: (\w+)$", out.stdout, re.M)
    model_id = re.search(r"models:/(m-\w+)", out.stdout + out.stderr)
    assert run_id and model_id, out.stdout
    image = next(data.rglob("*.jpg"))
    return {
        "dir": workdir,
        "data": data,
        "out": out,
        "<run id>": run_id.group(1),
        "<model id>": model_id.group(1),
        "<image file>": str(image),
    }


def _fill(snippet: str, trained: dict) -> str:
    for placeholder in ("<run id>", "<model id>", "<image file>"):
        snippet = snippet.replace(placeholder, trained[placeholder])
    assert "<" not in re.sub(r"#.*", "", snippet), f"a placeholder left: {snippet}"
    return snippet


def test_readme_is_a_front_door_whose_links_lead_somewhere():
    # Given README, the page a visitor sees first (the details live in docs/)
    text = README.read_text()

    # Then it stays about a screenful, and each relative link it gives names a file of the repo
    assert len(text.encode()) <= 12 * 1024
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if "://" not in link]
    assert any(link.startswith("docs/") for link in local), links
    missing = [link for link in local if not (ROOT / link).is_file()]
    assert not missing, missing


def test_quick_start_trains_from_where_the_user_is_and_says_where_things_went(trained):
    out, workdir = trained["out"], trained["dir"]
    # The runs are in mlruns/ of the launch directory, Hydra's log in outputs/ named for the job
    assert (workdir / "mlruns" / "mlflow.db").is_file()
    assert list(workdir.glob("outputs/*/*/insect_exp.log"))
    # The demo data's first generation names its path and the variable that moves it
    logged = out.stdout + out.stderr
    assert str(trained["data"]) in logged and "INSECT_EXP_CACHE_DIR" in logged
    # The UI command README shows opens the same store
    assert f"sqlite:///{workdir}/mlruns/mlflow.db" in out.stdout


def test_training_prints_the_tracking_uri_line_readme_asks_to_paste(trained):
    # The block that is one `export MLFLOW_TRACKING_URI=...` line
    (block,) = [
        b
        for b in _blocks(_section("Using a trained model"), "bash")
        if b.startswith("export MLFLOW_TRACKING_URI=") and b.strip().count("\n") == 0
    ]
    export = block.strip().replace("$PWD", str(trained["dir"])).replace('"', "")
    printed = trained["out"].stdout.replace('"', "").replace("'", "")
    assert export in printed, trained["out"].stdout


def _python_snippet() -> str:
    blocks = _blocks(_section("Using a trained model"), "python")
    (snippet,) = [b for b in blocks if "load_model" in b]
    return snippet


def test_model_snippet_loads_and_predicts_from_the_training_directory(trained):
    # As written, and with the other URI its comment offers: load_model("A")  # or "B"
    snippet = _python_snippet()
    match = re.search(r'load_model\("([^"]+)"\)\s*#\s*or\s*"([^"]+)"', snippet)
    assert match, snippet
    variants = [snippet, snippet.replace(f'"{match.group(1)}"', f'"{match.group(2)}"', 1)]
    prelude = ""
    if re.search(r"\bimages\b", snippet) and not re.search(r"^images\s*=", snippet, re.M):
        height, width = IMAGE_SIZE
        prelude = (
            "import numpy as np\n"
            f"images = np.random.default_rng(0).uniform(0, 255, (4, {height}, {width}, 3))\n"
        )
    result = re.search(r"^(\w+)\s*=\s*model\.predict\(", snippet, re.M)
    epilogue = f"\nprint('PREDICTED', len({result.group(1)}))\n" if result else ""
    # Both in one process (TensorFlow loads once), each in a namespace of its own
    program = "".join(
        f"exec({prelude + _fill(code, trained) + epilogue!r}, {{}})\n" for code in variants
    )

    out = subprocess.run(
        [sys.executable, "-c", program],
        cwd=trained["dir"],
        capture_output=True,
        text=True,
        timeout=180,
        env=_env(),
    )

    assert out.returncode == 0, out.stderr[-3000:]
    if result:
        predicted = 4 if prelude else 1  # four random images, or the one <image file>
        assert out.stdout.count(f"PREDICTED {predicted}") == 2, out.stdout
    # MLflow's default store (./mlflow.db) was never opened
    assert not (trained["dir"] / "mlflow.db").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_scoring_server_snippet_serves_the_model(trained):
    (block,) = [b for b in _blocks(_section("Using a trained model"), "bash") if "serve" in b]
    port = _free_port()
    script = re.sub(r"--port \d+", f"--port {port}", _fill(block, trained))
    bin_dir = str(Path(sys.executable).parent)  # this venv's mlflow
    server = subprocess.Popen(
        ["bash", "-euc", script],
        cwd=trained["dir"],
        env=_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, server.stdout.read().decode()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the scoring server did not come up"
                time.sleep(0.5)
        height, width = IMAGE_SIZE
        body = json.dumps({"inputs": [[[[128.0] * 3] * width] * height] * 2}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.load(response)
        assert len(answer["predictions"]) == 2
        assert not (trained["dir"] / "mlflow.db").exists()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def test_own_config_dir_example_composes(tmp_path):
    # Given the YAML files README shows, written where their first comment says
    section = _section("Configuration")
    written = []
    for block in _blocks(section, "yaml"):
        match = re.search(r"^# (team_conf/\S+\.yaml)", block, re.M)
        if match:
            path = tmp_path / match.group(1)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(block)
            written.append(match.group(1))
    assert {"team_conf/dataset/mine.yaml", "team_conf/experiment/quick.yaml"} <= set(written)

    # When README's --cfg job command runs in that directory
    (line,) = [
        line
        for block in _blocks(section, "bash")
        for line in block.splitlines()
        if "--config-dir" in line and "--cfg job" in line
    ]
    command = shlex.split(line.split("#")[0])
    out = subprocess.run(
        [sys.executable, *command[1:]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )

    # Then it prints the user's dataset and preset composed with the package's config
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    assert cfg["dataset"]["name"] == "mine" and cfg["epochs"] == 2


def _documented_commands() -> list[str]:
    """Every `python -m insect_exp ...` line of the pages' bash blocks, continuations joined."""
    commands = []
    for block in _blocks(_text(), "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if re.search(r"python -m insect_exp(\s|$)", line):
                commands.append(line.split("&&")[-1].strip())
    return commands


def _overrides(command: str) -> list[str] | None:
    """The overrides of a documented command, a sweep's first value for each key; None to skip."""
    words = shlex.split(command)
    words = words[words.index("insect_exp") + 1 :]
    if "--config-dir" in words or any("<" in w for w in words):
        return None  # composed by the tests above / a placeholder for a run
    overrides = []
    for word in words:
        if word.startswith("-"):
            continue  # -m, --cfg
        key, _, value = word.partition("=")
        if "," in value and not value.startswith("["):
            value = value.split(",")[0]
        overrides.append(f"{key}={value}" if value else word)
    return [o for o in overrides if "=" in o]


def test_every_documented_command_composes():
    commands = _documented_commands()
    assert len(commands) >= 10
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for command in commands:
            overrides = _overrides(command)
            if overrides is None:
                continue
            try:
                compose("config", overrides=overrides)
            except Exception as err:  # the command's own words in the failure
                pytest.fail(f"{command!r} does not compose: {err}")
