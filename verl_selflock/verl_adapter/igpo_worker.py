"""veRL's actor worker plus IGPO's packed scoring (one forward per trajectory, tree attention mask).

veRL's ``compute_log_prob`` forwards each sequence under a causal mask, so scoring T turn prefixes of a
trajectory through it costs ~T/2 trajectories. :class:`SelflockActorWorker` is veRL 0.9.1's
``ActorRolloutRefWorker`` (``workers/engine_workers.py``) with one more forward-only method that runs
:func:`verl_selflock.algorithms.igpo_packing.packed_answer_logprobs` on the actor's own FSDP module, in
its eval mode and mixed precision, as ``TrainingWorker.infer_batch`` does. The trainer mode puts this
class in the actor's role when IGPO scores packed (:mod:`verl_selflock.verl_adapter.trainer_mode`), the
way veRL's own ``trainer_separate_async`` swaps in ``DetachActorWorker``.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.distributed as dist
from tensordict import TensorDict
from verl.single_controller.base.decorator import make_nd_compute_dataproto_dispatch_fn, register
from verl.utils import tensordict_utils as tu
from verl.utils.device import get_device_id, get_device_name
from verl.workers.engine_workers import ActorRolloutRefWorker

from verl_selflock.algorithms.igpo_packing import PackedRow, packed_answer_logprobs
from verl_selflock.algorithms.igpo_plan import chunk_by_tokens
from verl_selflock.verl_adapter.jagged import rows

PACKED_FIELDS = ("input_ids", "position_ids", "igpo_segment", "igpo_answer_mask")
"""Per-row fields of a packed scoring row in TransferQueue (jagged int64, one value per token)."""
OUTPUT_FIELD = "igpo_log_probs"
"""Per-row output: (N,) float32 log-probs of the row's answer tokens, 0 elsewhere."""
MICRO_TOKENS_KEY = "igpo_micro_tokens"
"""``extra_info`` key: tokens per forward (packed rows concatenated up to it)."""


class SelflockActorWorker(ActorRolloutRefWorker):
    """``ActorRolloutRefWorker`` with :meth:`compute_igpo_answer_logprobs`."""

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="actor"))
    def compute_igpo_answer_logprobs(self, data: TensorDict) -> TensorDict | None:
        """Answer log-probs of this rank's packed scoring rows (:data:`PACKED_FIELDS`), at ``temperature``.

        Every rank of the model runs the same number of forwards (FSDP gathers the weights in each), so
        a rank with fewer micro-batches forwards one-token fillers.
        """
        engine = self.actor.engine
        temperature = float(tu.get(data, "temperature", default=1.0))
        micro_tokens = int(tu.get(data, MICRO_TOKENS_KEY))
        packed = [
            PackedRow(ids, positions, segment, answer.bool(), torch.zeros(0, dtype=torch.int64))
            for ids, positions, segment, answer in zip(*(rows(data[key]) for key in PACKED_FIELDS), strict=True)
        ]
        runs = chunk_by_tokens([len(row) for row in packed], micro_tokens)
        module = engine.module
        # the engine's device, as its forward_step uses (parameters may sit on the CPU when offloaded)
        device = torch.device("cpu") if get_device_name() == "cpu" else torch.device(get_device_name(), get_device_id())
        forwards = torch.tensor([len(runs)], dtype=torch.int64, device=device)
        if dist.is_initialized():
            dist.all_reduce(forwards, op=dist.ReduceOp.MAX)
        autocast_dtype = getattr(engine, "_autocast_dtype", torch.bfloat16)
        autocast = (
            nullcontext() if autocast_dtype == torch.float32
            else torch.autocast(device_type=get_device_name(), dtype=autocast_dtype)
        )
        filler = [PackedRow.padding(int(packed[0].input_ids[0]) if packed else 0)]
        logprobs: list[torch.Tensor] = []
        with engine.eval_mode(), torch.no_grad(), autocast:
            for k in range(int(forwards.item())):
                if k < len(runs):
                    logprobs += packed_answer_logprobs(module, [packed[i] for i in runs[k]], temperature, device)
                else:
                    packed_answer_logprobs(module, filler, temperature, device)
        if not engine.is_mp_src_rank_with_outputs():
            return None
        nested = torch.nested.as_nested_tensor(logprobs, layout=torch.jagged)
        return TensorDict({OUTPUT_FIELD: nested}, batch_size=len(packed))
