"""Which placement a scan gets: a replica's stages together on one node where a node can hold them."""

from cluster.placement import fits, replica_bundle, stage_bundle


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
