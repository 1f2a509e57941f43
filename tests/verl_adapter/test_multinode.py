"""A real two-node Ray cluster on one machine (``ray.cluster_utils.Cluster``): veRL's ``AgentLoopWorker``
runs on the second node, with its own cache folder, and plays a PE episode and a MediQ episode whose
simulated patient is served on loopback (issue 14).

What would break on real nodes, and is made to break here:

* the config is composed from the MediQ recipe and validated on the driver (which pins
  ``${oc.env:SELFLOCK_SIMULATOR_BASE_URL,...}`` to the driver's value), then resolved by a TaskRunner
  stand-in on node 1, as ``main_ppo`` does; neither node's environment has the URL variable;
* the caches of the driver and of node 1 are deleted before node 2 starts its worker: nothing the worker
  opens may live only on another node's disk (the agent-loop YAML used to);
* the patient wants an API key that only node 2's environment holds (each worker reads it from its own
  environment, the config holds only the variable's name): the same config on node 1, without the key,
  is refused at start-up with the URL, instead of degrading every turn to critique 0.

The policy is a scripted token server (what generation runs on does not matter here); ~1-2 min on 2 cores.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

ray = pytest.importorskip("ray")

from fixtures.mediq_rows import COUGH_CASE
from fixtures.servers import ScriptedServer
from simulators.endpoints import Endpoint

from verl_selflock.contracts import episode as ef
from verl_selflock.contracts.names import AGENT_NAME
from verl_selflock.data.mediq import build_mediq_rows

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes"
KEY_ENV = "SELFLOCK_SIMULATOR_API_KEY"
KEY = "sk-multinode-test-key"
IM_END = "<|im_end|>"
CASE = dataclasses.replace(COUGH_CASE, case_id="multinode-1")
MEDIQ_SCRIPT = [
    "<scratch>a</scratch><interact>Query: Do you have a fever?</interact>" + IM_END,
    "<interact>Guess: 4,1,1,1</interact>" + IM_END,
    "<interact>Query: Do you smoke?</interact>" + IM_END,
    "<answer>4,1,1,1</answer>" + IM_END,
]
PE_SCRIPT = ["<answer>1,1,1</answer>" + IM_END] * 6


class TwoTaskServer(ScriptedServer):
    """The MediQ script for the MediQ prompt, the PE one for anything else (pickled by value to the node)."""

    def choose_script(self, prompt_ids: list[int]) -> list[str]:
        return MEDIQ_SCRIPT if CASE.initial in self.tokenizer.decode(prompt_ids) else PE_SCRIPT


@ray.remote(num_cpus=1)
class TaskRunnerStandIn:
    """What ``main_ppo``'s TaskRunner does with the config (``OmegaConf.resolve``), on node 1; and the same
    agent-loop worker there, for the start-up refusal."""

    def resolve(self, config: Any) -> Any:
        from omegaconf import OmegaConf

        import verl_selflock.verl_adapter.plugin  # noqa: F401  (the resolvers, as `import verl` registers them)

        OmegaConf.resolve(config)
        return config

    def run_worker(self, config: Any, server: Any, batch: Any) -> str:
        import asyncio

        from verl.experimental.agent_loop.agent_loop import AgentLoopWorker

        try:
            asyncio.run(AgentLoopWorker(config, llm_client=server).generate_sequences(batch))
        except Exception as err:  # noqa: BLE001  (the message is what the test checks)
            return f"{type(err).__name__}: {err}"
        return "no error"


def _where(worker: Any) -> tuple[str, str]:
    """The node id and cache folder of an actor's process."""

    def probe(_: Any) -> tuple[str, str]:
        return ray.get_runtime_context().get_node_id(), os.environ.get("VERL_SELFLOCK_CACHE", "")

    return ray.get(worker.__ray_call__.remote(probe), timeout=60)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    root = tmp_path_factory.mktemp("multinode")
    caches = {name: root / f"{name}_cache" for name in ("driver", "node1", "node2")}
    saved = {key: os.environ.pop(key, None) for key in ("SELFLOCK_SIMULATOR_BASE_URL", KEY_ENV, "RAY_ADDRESS")}
    small = {"num_cpus": 2, "object_store_memory": 80 * 1024**2}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={**small, "include_dashboard": False, "resources": {"node1": 1},
                        "env_vars": {"VERL_SELFLOCK_CACHE": str(caches["node1"])}},
    )
    cluster.add_node(**small, resources={"node2": 1},
                     env_vars={"VERL_SELFLOCK_CACHE": str(caches["node2"]), KEY_ENV: KEY})
    # Workers import the test fixtures (the scripted server's base class); the code under test comes from
    # wherever this interpreter gets it (PYTHONPATH first, as in the driver).
    path = os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
    ray.init(address=cluster.address, runtime_env={"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}})
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    node2_id = next(node["NodeID"] for node in ray.nodes() if "node2" in node["Resources"])
    try:
        yield cluster, node2_id, caches
    finally:
        ray.shutdown()
        cluster.shutdown()
        for key, value in saved.items():
            if value is not None:
                os.environ[key] = value


def _batch() -> Any:
    """A batch of one MediQ row (simulated patient) and one PE row, as veRL's dataloader hands it over."""
    import numpy as np
    from verl.protocol import DataProto

    from verl_selflock.data.pe import PEDataConfig, build_pe_rows

    twin = dataclasses.replace(CASE, case_id="multinode-2")
    mediq = build_mediq_rows([CASE, twin], seed=0, n_val=1, max_turns=4, progress=False)["train"][0]
    (pe,) = build_pe_rows(PEDataConfig("gated", 6, 3, 4), n_train=1, n_test=0, seed=5, progress=False)["train"]
    rows = [mediq, pe]

    def column(values: list) -> Any:
        out = np.empty(len(values), dtype=object)
        for i, value in enumerate(values):
            out[i] = value
        return out

    batch = DataProto.from_single_dict(
        {
            "raw_prompt": column([row["prompt"] for row in rows]),
            "extra_info": column([row["extra_info"] for row in rows]),
            "data_source": column([row["data_source"] for row in rows]),
            "agent_name": np.array([AGENT_NAME] * 2, dtype=object),
            "index": np.arange(2),
        }
    )
    return batch


def test_agent_loop_workers_on_another_node_get_knobs_endpoint_and_key(cluster, smollm2_dir, chatml_tokenizer,
                                                                       tmp_path, monkeypatch):
    import verl  # noqa: F401  (installs our driver-side validation)
    from hydra import compose, initialize_config_dir
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    from verl.experimental.agent_loop.agent_loop import AgentLoopWorker
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    from verl_selflock.data.pe import build_pe_dataset

    _, node2_id, caches = cluster
    monkeypatch.setenv("VERL_SELFLOCK_CACHE", str(caches["driver"]))
    data = build_pe_dataset("gated", 3, 4, 2, 0, tmp_path / "data", max_turns=4, progress=False)
    batch = _batch()
    with Endpoint(models=["patient"], key=KEY) as patient:
        # 1. The driver: the recipe as a user runs it, the endpoint from the launching shell only.
        monkeypatch.setenv("SELFLOCK_SIMULATOR_BASE_URL", patient.base_url)
        monkeypatch.setenv("SELFLOCK_SIMULATOR_MODEL", "patient")
        overrides = [
            f"actor_rollout_ref.model.path={smollm2_dir}", f"data.train_files={data['train']}",
            f"data.val_files={data['test']}", "selflock_agent_loop.max_turns=4",
            "selflock_agent_loop.simulator.max_retries=0", "selflock_agent_loop.simulator.timeout_s=20",
        ]
        with initialize_config_dir(config_dir=str(RECIPES / "mediq"), version_base=None):
            config = compose(config_name="arew_as", overrides=overrides)
        validate_config(config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))

        # 2. The TaskRunner on node 1 resolves the config; then the driver's and node 1's disks "go away".
        head = TaskRunnerStandIn.options(resources={"node1": 0.01}).remote()
        config = ray.get(head.resolve.remote(config), timeout=300)
        for name in ("driver", "node1"):
            shutil.rmtree(caches[name], ignore_errors=True)
        assert config.selflock_agent_loop.simulator.base_url == patient.base_url

        # 3. veRL's AgentLoopWorker on node 2, created as AgentLoopManager creates it.
        server = TwoTaskServer(chatml_tokenizer, [], stop_ids={chatml_tokenizer.convert_tokens_to_ids(IM_END)})
        strategy = NodeAffinitySchedulingStrategy(node_id=node2_id, soft=False)
        worker = ray.remote(AgentLoopWorker).options(num_cpus=1, scheduling_strategy=strategy).remote(config, server)
        assert _where(worker) == (node2_id, str(caches["node2"]))
        out = ray.get(worker.generate_sequences.remote(batch), timeout=300)
        patient_calls = [call for call in patient.seen if call[0] == "POST"]

        # 4. The same config on node 1, which lacks the key: refused at start-up, naming URL and variable.
        refused = ray.get(head.run_worker.remote(config, server, batch), timeout=300)
        assert _where(head)[0] != node2_id

    turns, rewards = out.non_tensor_batch[ef.TURNS].tolist(), out.non_tensor_batch[ef.REWARD].tolist()
    assert turns[0] == 4 and rewards[0] == 1.0  # MediQ: Q1, guess, Q2, the right answer
    assert turns[1] >= 1 and out.non_tensor_batch[ef.STOP_REASON][1] in (ef.STOP_ANSWER, ef.STOP_MAX_TURNS)
    env = out.non_tensor_batch[ef.ENV_METRICS][0]
    assert env["sim_calls"] == 2 and env["sim_failures"] == 0  # the patient answered both questions
    assert len(patient_calls) == 2 and all(auth == f"Bearer {KEY}" for _, _, auth in patient_calls)
    assert f"simulator.base_url {patient.base_url} (model patient): the start-up check from" in refused
    assert "HTTP 401" in refused and f"${KEY_ENV}, which is not set on this node" in refused
    assert KEY not in refused
    for cache in caches.values():  # nothing was written for the agent loop on any node
        assert not (cache / "agent_loops").exists()
