"""The command line as a user meets it: a real scan read back by four libraries, and errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster import placement
from cluster.cli import main
from cluster.driver import run_scan
from cluster.partition import partition_layers
from neuroscan.config import ScanConfig
from neuroscan.errors import UserError
from tests.same_output import files

ROOT = Path(__file__).resolve().parents[2]
NEUROSCAN = [sys.executable, "-m", "cluster.cli"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*NEUROSCAN, *args], capture_output=True, text=True, cwd=ROOT, env=os.environ.copy(), timeout=600
    )


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, corpus):
    """One full scan through the console entry point, in its own process with its own Ray."""
    out = tmp_path_factory.mktemp("cli") / "run"
    result = run_cli("scan", str(corpus), "--out", str(out), "--stages", "3", "--batch-tokens", "600")
    assert result.returncode == 0, result.stderr[-2000:]
    return out, result


def test_scan_prints_path_and_per_layer_summary(cli_run):
    out, result = cli_run
    summary = result.stderr[result.stderr.index(f"wrote {out}") :]
    assert "mean selected" in summary and result.stdout == ""
    assert sum(1 for line in summary.splitlines() if line.strip()[:2].strip().isdigit()) == 28
    assert "prompt" in result.stderr and "tok/s" in result.stderr  # the progress bar went to stderr
    assert summary.splitlines()[-1].startswith("fidelity check passed (9 prompts run again alone")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["stages"] == 3
    assert manifest["model"]["id"] == "embedded:tiny" and Path(manifest["model"]["path"]).is_dir()
    assert manifest["selection"] == {"high": 3.0, "low": 0.0, "max_per_layer": 500}
    assert manifest["bands"] == {"low": 0.0, "high": 3.0, "red": 3.5}
    assert manifest["versions"]["torch"] and manifest["versions"]["pyarrow"]


def test_scan_says_each_step_of_its_start_on_stderr_and_leaves_stdout_empty(cli_run, corpus):
    """A line as each step of the start ends (the corpus read, Ray started, each stage loaded,
    in the order they finish), then the bar, then the summary with the command's whole time
    beside the scan's; all on stderr, plain text where stderr is not a terminal."""
    out, result = cli_run
    err, said = result.stderr, result.stderr.splitlines()
    assert "\x1b" not in err and "\x1b" not in result.stdout
    assert re.search(
        rf"^9 prompts, [\d,]+ tokens: {re.escape(str(corpus))} read and tokenised \([\d.]+ s\)$", err, re.M
    )
    assert "starting a local Ray ..." in said and re.search(r"^Ray started \([\d.]+ s\)$", err, re.M)
    assert "loading 3 stages x 1 replica (28 layers, cpu) ..." in said
    loaded = re.findall(r"^stage (\d)/3 loaded \(layers (\d+)-(\d+), [\d.]+ s\)$", err, re.M)
    assert sorted(loaded) == [(str(s + 1), str(a), str(b - 1)) for s, (a, b) in enumerate(partition_layers(28, 3))]
    steps = [err.index(line) for line in ("starting a local Ray", "Ray started", "loading 3 stages", "stage ", "0/9")]
    assert steps == sorted(steps)
    first = next(line for line in said if line.startswith("wrote "))
    times = re.fullmatch(
        rf"wrote {re.escape(str(out))}  \(9 prompts, \d+ tokens, \d+ activation rows, "
        r"scanned in ([\d.]+) s at [\d,]+ tokens/s; ([\d.]+) s in all\)",
        first,
    )
    assert times and float(times[2]) > float(times[1]), first
    assert result.stdout == ""


def _layer_five(reader: str, out: Path) -> tuple[str, int, int]:
    """(the type ``reader`` gives ``layer``, its count of rows with layer = 5, rows in all),
    each reader called on the output directory as its documentation shows, with no options."""
    acts = out / "activations"
    glob = str(acts / "**" / "*.parquet")
    if reader == "pyarrow":
        import pyarrow.dataset as ds

        table = ds.dataset(acts).to_table()
        return (
            str(table.schema.field("layer").type),
            ds.dataset(acts).count_rows(filter=ds.field("layer") == 5),
            len(table),
        )
    if reader == "pandas":
        import pandas as pd

        frame = pd.read_parquet(acts)
        return str(frame["layer"].dtype), int((frame["layer"] == 5).sum()), len(frame)
    if reader == "polars":
        import polars as pl

        frame = pl.scan_parquet(glob)
        five = frame.filter(pl.col("layer") == 5).select(pl.len()).collect().item()
        return str(frame.collect_schema()["layer"]), five, frame.select(pl.len()).collect().item()
    if reader == "duckdb":
        import duckdb

        con = duckdb.connect()
        kind = con.execute(f"select typeof(layer) from read_parquet('{glob}') limit 1").fetchone()[0]
        five = con.execute(f"select count(*) from read_parquet('{glob}') where layer < 6 and layer > 4").fetchone()[0]
        return kind, five, con.execute(f"select count(*) from read_parquet('{glob}')").fetchone()[0]
    import datasets

    data = datasets.load_dataset("parquet", data_files=glob, split="train", cache_dir=str(out.parent / "hf"))
    return str(data.features["layer"].dtype), len(data.filter(lambda row: row["layer"] == 5)), len(data)


@pytest.mark.parametrize(
    "reader, kind",
    [("pyarrow", "int32"), ("pandas", "int32"), ("polars", "Int32"), ("duckdb", "INTEGER"), ("datasets", "int32")],
)
def test_every_reader_gives_an_integer_layer_and_filters_on_it(cli_run, reader, kind):
    import pyarrow.dataset as ds

    out, _ = cli_run
    truth = ds.dataset(out / "activations").to_table(columns=["layer"])["layer"].to_numpy()
    assert len(truth) == json.loads((out / "manifest.json").read_text())["totals"]["activation_rows"] > 0
    assert (truth == 5).sum() > 0 and len(set(truth.tolist())) == 28
    assert _layer_five(reader, out) == (kind, (truth == 5).sum(), len(truth))


def test_prompts_read_in_pandas(cli_run):
    import pandas as pd

    out, _ = cli_run
    assert len(pd.read_parquet(out / "prompts")) == 9


def test_bad_input_is_one_line_without_traceback(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n')
    result = run_cli("scan", str(bad), "--out", str(tmp_path / "o"))
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert f"{bad}:2: invalid JSON" in result.stderr
    assert not (tmp_path / "o").exists()  # nothing written


def test_non_empty_output_directory_is_refused(capsys, tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("mine")
    for flags in ([], ["--overwrite"], ["--resume"]):
        assert main(["scan", "seed", "--out", str(tmp_path / "o"), *flags]) == 2
        assert "is not empty and not a neuroscan output directory" in capsys.readouterr().err
    assert (tmp_path / "o" / "keep.txt").read_text() == "mine"


def test_a_directory_another_scan_is_writing_is_left_alone(cli_run, tmp_path, capsys):
    out = tmp_path / "busy"
    shutil.copytree(cli_run[0], out)
    before = files(out)
    holder = subprocess.Popen(  # another scan's driver: it claims --out for its run
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; from cluster.output import claim\n"
            f"with claim(Path({str(out)!r})):\n    print('held', flush=True); sys.stdin.read()",
        ],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        for flags in (["--resume"], ["--overwrite"], []):
            assert main(["scan", "seed", "--out", str(out), "--quiet", *flags]) == 2
            err = capsys.readouterr().err
            assert err == (
                f"neuroscan: error: --out {out} is in use by another neuroscan scan: wait for it to end "
                "(or stop it and --resume), or choose another directory\n"
            ), flags
        assert files(out) == before
    finally:
        holder.communicate("", timeout=30)
    assert main(["scan", "seed", "--out", str(out), "--quiet", "--overwrite"]) == 0  # free again once it ends
    assert json.loads((out / "manifest.json").read_text())["corpus"]["source"] == "seed"


def test_resume_says_what_it_found(cli_run, corpus, tmp_path, capsys):
    done = tmp_path / "done"
    shutil.copytree(cli_run[0], done)
    before = files(done)
    assert (
        main(["scan", str(corpus), "--out", str(done), "--stages", "3", "--batch-tokens", "600", "--quiet", "--resume"])
        == 0
    )
    shown = capsys.readouterr()
    assert shown.err.startswith(
        f"{done} is already complete: nothing to scan (--overwrite scans it again)\nwrote {done}  ("
    )
    assert shown.out == ""
    assert files(done) == before
    typo = tmp_path / "typo"  # --resume in a directory that holds no run: the scan starts, and says so
    assert main(["scan", "seed", "--out", str(typo), "--quiet", "--resume"]) == 0
    assert capsys.readouterr().err.startswith(
        f"nothing to resume in {typo} (no manifest.json): starting the scan from the beginning\nwrote {typo}  ("
    )
    assert json.loads((typo / "manifest.json").read_text())["status"] == "complete"


def test_answers_without_their_leading_space_are_pointed_out(tmp_path, capsys):
    """`correct` compares tokens: "mango" after "Next Word:" is not GPT-J's " mango"."""
    corpus = tmp_path / "c.jsonl"
    rows = [
        {"text": "apple, banana, cherry Next Word:", "expected": "mango"},
        {"text": "1, 2, 3,", "expected": " 4"},
        {"text": "Say: ", "expected": "hi"},
        {"text": "no answer"},
    ]
    corpus.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert main(["scan", str(corpus), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    assert capsys.readouterr().err.startswith(
        "note: 1 of 3 expected answers start without a space, after a prompt that ends without one; `correct` scores "
        'each answer exactly as given, and a next word\'s token usually starts with the space (" mango", not "mango")\n'
        f"wrote {tmp_path / 'o'}  ("
    )


def test_more_gpus_than_the_cluster_has(ray_session, tmp_path):
    cfg = ScanConfig(prompts="seed", out=str(tmp_path / "o"), device="cuda", stages=3, replicas=2, quiet=True)
    with pytest.raises(UserError, match=r"needs 6 GPU \(6 stage actors\) but the Ray cluster has 4"):
        run_scan(cfg)


def test_a_cluster_without_gpus_points_at_the_cpu(monkeypatch):
    monkeypatch.setattr(placement.ray, "cluster_resources", lambda: {"CPU": 2.0, "memory": 16 * 2**30})
    with pytest.raises(UserError) as error:
        placement.check_resources("cuda", 1)
    assert str(error.value) == (
        "the scan needs 1 GPU (1 stage actor) but the Ray cluster has 0 (CPU=2, memory=16.0 GiB): "
        "use --device cpu, or set RAY_ADDRESS to a Ray cluster with GPUs"
    )


def test_each_replica_is_one_bundle_of_its_stages_on_logical_gpus(ray_session):
    import ray
    from ray.util.placement_group import placement_group_table

    reserved = placement.reserve("cuda", 2, 2)
    try:
        table = placement_group_table(reserved.group)
        assert table["state"] == "CREATED" and table["strategy"] == "SPREAD"
        assert [b for b in table["bundles"].values()] == [{"CPU": 2.0, "GPU": 2.0}] * 2
        assert reserved.per_replica and [reserved.bundle(1, s) for s in range(2)] == [1, 1]
        assert [reserved.nodes(r) for r in range(2)] == [{ray.get_runtime_context().get_node_id()}] * 2
    finally:
        ray.util.remove_placement_group(reserved.group)


def test_the_aggregator_runs_on_the_drivers_node(ray_session):
    """It writes --out, a path on the driver's machine: on a multi-node cluster Ray would
    otherwise be free to start this CPU-less actor on another node (and its disk)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    class Probe:
        def node(self):
            return ray.get_runtime_context().get_node_id()

    options = placement.aggregator_options()
    strategy = options["scheduling_strategy"]
    assert isinstance(strategy, NodeAffinitySchedulingStrategy) and not strategy.soft
    assert strategy.node_id == ray.get_runtime_context().get_node_id()
    probe = ray.remote(Probe).options(**options).remote()  # Ray takes the options (one node here: where is not shown)
    try:
        assert ray.get(probe.node.remote()) == strategy.node_id
    finally:
        ray.kill(probe)


class Busy:
    """An actor whose work waits until a file appears: a stage or aggregator with calls queued."""

    def work(self, flag: str) -> bool:
        while not Path(flag).exists():
            time.sleep(0.01)
        return True

    def memory(self) -> str:
        return "answered"


@pytest.mark.parametrize("kind", ["stage", "aggregator"])
def test_memory_is_answered_while_an_actor_works_through_its_queue(ray_session, tmp_path, kind):
    """A scan's manifest records every actor's memory when it ends; in a service other scans'
    micro-batches are queued on those actors then, and the answer must not wait for them."""
    import ray

    if kind == "stage":
        group = placement.reserve("cpu", 1, 1).group
        actor = placement.stage_actor(Busy, group, 0, "cpu", f"busy-{kind}").remote()
    else:
        group, actor = None, placement.aggregator_actor(Busy, f"busy-{kind}").remote()
    try:
        flag = tmp_path / "go"
        queued = [actor.work.remote(str(flag)) for _ in range(3)]
        answer = actor.memory.options(concurrency_group=placement.INFO).remote()
        ready, _ = ray.wait([answer], timeout=60)
        assert ready and ray.get(answer) == "answered"
        assert not ray.wait(queued, timeout=0)[0]  # still held up, behind the flag
        flag.touch()
        assert ray.get(queued) == [True] * 3
    finally:
        ray.kill(actor)
        if group is not None:
            placement.remove_placement_group(group)


@pytest.mark.parametrize(
    "command, name",
    [
        (["scan", "seed"], "out"),
        (["prompts", "generate", "--n", "3"], "p.jsonl"),
        (["make-model", "--preset", "tiny"], "model"),
        (["bench", "--prompts", "1"], "bench.json"),
    ],
)
def test_an_out_that_cannot_be_created_is_one_line(capsys, tmp_path, command, name):
    """Under a file, no directory can be made: one line naming the flag, the path and why."""
    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    out = blocker / "sub" / name
    assert main([*command, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"neuroscan: error: --out {out}: cannot create {blocker / 'sub'}") and err.count("\n") == 1
    assert err.endswith("(Not a directory): choose a writable place\n")
    assert blocker.read_text() == "mine"


def test_make_model_writes_a_loadable_checkpoint(capsys, tmp_path):
    assert main(["make-model", "--preset", "tiny", "--out", str(tmp_path / "m")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "m")
    from workers.checkpoint import resolve_model

    assert resolve_model(str(tmp_path / "m")).path == str((tmp_path / "m").resolve())
    assert main(["make-model", "--preset", "huge", "--out", str(tmp_path / "n")]) == 2
    assert main(["make-model", "--out", str(tmp_path / "m")]) == 2  # not empty
    (tmp_path / "f").write_text("mine")
    capsys.readouterr()
    assert main(["make-model", "--out", str(tmp_path / "f")]) == 2
    assert capsys.readouterr().err == f"neuroscan: error: --out {tmp_path / 'f'} is a file: give a directory\n"


def test_a_full_disk_while_writing_a_checkpoint_is_one_line_and_leaves_nothing(capsys, tmp_path, monkeypatch):
    from safetensors import SafetensorError

    from workers import embedded

    def disk_full(tensors, path, metadata=None):
        Path(path).write_bytes(b"half a shard")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(embedded, "save_file", disk_full)
    out = tmp_path / "m"
    assert main(["make-model", "--preset", "tiny", "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"neuroscan: error: writing a checkpoint to {out} failed (No space left on device (os error 28)): it needs "
        "0.02 GiB; free space or choose another place, then run it again\n"
    )
    assert list(out.iterdir()) == []
    monkeypatch.setenv("NEUROSCAN_CACHE", str(tmp_path / "cache"))  # the embedded model, written on first use
    with pytest.raises(
        UserError, match=r"cache/models/\S+ failed \(No space left .*set NEUROSCAN_CACHE to a place with room"
    ):
        embedded.embedded_model_dir()
    assert list((tmp_path / "cache" / "models").iterdir()) == []  # no half model to load next time


def test_neurons_table_matches_the_activations(cli_run):
    import pyarrow.dataset as ds

    out, _ = cli_run
    acts = ds.dataset(out / "activations").to_table().to_pandas()
    neurons = ds.dataset(out / "neurons").to_table().to_pandas()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["neurons"]["rows"] == len(neurons) == len(acts.groupby(["layer", "neuron"]))
    for _, row in neurons.sample(50, random_state=0).iterrows():
        mine = acts[(acts.layer == row.layer) & (acts.neuron == row.neuron)]
        ranked = mine.sort_values(["max_act", "prompt_id"], ascending=[False, True]).head(20)
        assert list(row.top_prompt_ids) == ranked.prompt_id.tolist()
        assert list(row.top_pos) == ranked.max_pos.tolist()
        assert row.n_prompts == len(mine) and row.n_red == int((mine.max_act > 3.5).sum())
        assert row.max_act == mine.max_act.max()


def test_a_scan_that_keeps_nothing_says_so_and_its_tables_read_empty(ray_session, tmp_path, capsys):
    import pandas as pd
    import polars as pl

    out = tmp_path / "none"
    assert main(["scan", "seed", "--out", str(out), "--high", "1000", "--low=-1000", "--red", "1000", "--quiet"]) == 0
    said = capsys.readouterr().err
    assert "0 activation rows" in said
    assert (
        "no neuron went above --high 1000 or below --low -1000 on any token: the tables are empty; lower --high or raise --low"
        in said
    )
    assert sorted(p.name for p in (out / "activations").iterdir()) == [f"layer_{i:02d}" for i in range(28)]
    assert len(pd.read_parquet(out / "activations")) == 0
    assert pl.scan_parquet(str(out / "activations" / "**" / "*.parquet")).collect().height == 0
    assert main(["report", str(out)]) == 0 and (out / "report" / "index.html").exists()


def test_more_actors_than_the_machine_can_run_is_refused_before_anything_starts(tmp_path):
    """224 stage processes on a few cores made no progress for minutes; now one line, nothing written."""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run(
        [*NEUROSCAN, "scan", "seed", "--out", str(out), "--stages", "28", "--replicas", "8"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "the scan needs 225 actor processes (stages x replicas, and the aggregators)" in result.stderr
    assert "lower --stages or --replicas" in result.stderr and not out.exists()


def test_a_corpus_column_reaches_prompts_and_groups_compare(ray_session, tmp_path, capsys):
    """``topic`` and ``level`` (null in the first micro-batches) come out of a real scan as
    columns of prompts/, one type in every part, and ``compare --by topic --b rest`` reads them."""
    import pandas as pd
    import pyarrow.parquet as pq

    corpus = tmp_path / "c.jsonl"
    topics = ["math", "math", "math", "art", "art", "history", "history", None]
    rows = [{"text": f"{i} plus {i} is", "topic": t, "level": i if i >= 4 else None} for i, t in enumerate(topics)]
    corpus.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "run"
    argv = ["scan", str(corpus), "--out", str(out), "--batch-tokens", "16", "--rows-per-part", "1", "--quiet"]
    assert main(argv) == 0
    parts = sorted((out / "prompts").glob("*.parquet"))
    assert len(parts) > 2 and len({pq.read_schema(f).remove_metadata() for f in parts}) == 1
    assert json.loads((out / "manifest.json").read_text())["corpus"]["columns"] == {"topic": "string", "level": "int64"}
    frame = pd.read_parquet(out / "prompts").sort_values("prompt_id")
    assert frame["topic"].tolist()[:7] == topics[:7] and frame["level"].dropna().tolist() == [4, 5, 6, 7]
    capsys.readouterr()
    compared = tmp_path / "math_vs_rest.parquet"
    argv = ["compare", str(out), "--by", "topic", "--a", "math", "--b", "rest", "--sort", "q", "--top", "20"]
    assert main([*argv, "--out", str(compared)]) == 0
    assert capsys.readouterr().out.startswith("A = math (3 prompts), B = rest (4 prompts); wrote 20 of ")
    table = pq.read_table(compared)
    q = table["q"].to_numpy()
    assert table.num_rows == 20 and (q[:-1] <= q[1:]).all() and ((0 < q) & (q <= 1)).all()
