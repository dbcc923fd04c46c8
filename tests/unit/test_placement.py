"""Which placement a scan gets: a replica's stages together on one node where a node can hold them."""

import pytest

from cluster.placement import fits, ray_reason, replica_bundle, stage_bundle
from neuroscan.errors import UserError


def test_a_replica_is_its_stages_together():
    assert replica_bundle("cuda", 3, gpus=0.5) == {"CPU": 3, "GPU": 1.5}
    assert replica_bundle("cpu", 2) == {"CPU": 2} == {k: 2 * v for k, v in stage_bundle("cpu").items()}


def test_replicas_fit_only_where_one_node_holds_each_whole():
    eight_gpu_nodes = [{"CPU": 192, "GPU": 8}] * 2
    assert fits({"CPU": 2, "GPU": 2}, 8, eight_gpu_nodes)  # four replicas a node
    assert not fits({"CPU": 2, "GPU": 2}, 9, eight_gpu_nodes)
    assert not fits({"CPU": 16, "GPU": 16}, 1, eight_gpu_nodes)  # 16 GPUs in all, but not on one node
    assert fits({"CPU": 2}, 3, [{"CPU": 2}, {"CPU": 1}, {"CPU": 2}, {"CPU": 2}])  # the 1-CPU node is skipped
    assert not fits({"CPU": 1, "GPU": 1}, 1, [{"CPU": 8}])  # a resource the node lacks


def test_ray_lines_go_to_stderr_and_cluster_errors_to_the_log(monkeypatch, tmp_path, capsys):
    """What Ray's driver prints (on stdout, by default) never reaches stdout: the cluster's
    error lines go to the session's log, any other line to stderr, without colour codes."""
    from types import SimpleNamespace

    from ray._private import worker

    from cluster import placement

    monkeypatch.setattr(worker, "print_to_stdstream", worker.print_to_stdstream)  # put back afterwards
    monkeypatch.setattr(worker.global_worker, "node", SimpleNamespace(get_logs_dir_path=lambda: str(tmp_path)))
    monkeypatch.setenv("RAY_COLOR_PREFIX", "0")
    placement._log_cluster_errors()
    worker.print_to_stdstream({"lines": ["loaded"], "pid": 42, "is_err": False}, ignore_prefix=False)
    worker.print_to_stdstream({"lines": ["A worker died"], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    out, err = capsys.readouterr()
    assert out == "" and err == "(pid=42) loaded\n"
    assert (tmp_path / "neuroscan-cluster-errors.log").read_text() == "A worker died\n"


@pytest.mark.parametrize(
    "message, reason",
    [
        (  # as Ray 2.60 words an actor whose owner's node crashed
            "The actor died unexpectedly before finishing this task.\n\tclass_name: A\n\tpid: 3555\n"
            "The actor is dead because its owner has died. Owner Id: 01000000ff Owner worker exit type: "
            "SYSTEM_ERROR Worker exit detail: Owner's node has crashed.",
            "Owner's node has crashed.",
        ),
        (  # a task error whose first line is the call, in colour codes
            "\x1b[36mray::AggregatorHost.add()\x1b[39m (pid=2874, ip=192.0.2.2, actor_id=0c08, repr=<object at 0x7f>)",
            "AggregatorHost.add() failed, pid 2874 on 192.0.2.2",
        ),
        (
            "The actor is dead because it was killed by `ray.kill`.",
            "The actor is dead because it was killed by `ray.kill`.",
        ),
        ("", "RuntimeError"),
    ],
)
def test_a_ray_error_is_said_in_its_own_words_without_colour_codes(message, reason):
    assert ray_reason(RuntimeError(message)) == reason


def test_neuroscans_own_line_raised_in_an_actor_is_said_as_it_is():
    err = RuntimeError("\x1b[36mray::Stage.setup()\x1b[39m (pid=1, ip=10.0.0.1)\nTraceback ...")
    err.cause = UserError("the stage of layers 0-13 (of 28) needs 12.1 GiB on cuda:0 but 3.0 GiB is free: ...")
    assert ray_reason(err) == str(err.cause)
