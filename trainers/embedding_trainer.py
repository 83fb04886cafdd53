"""UniMEV2Trainer: judgment-based soft-label distribution alignment (arXiv 2510.13515, "MLLM Judgment Based Training
Framework") as a `transformers.Trainer` subclass.

Losses: ``soft_label`` (the paper: per query, softmax over [positive, k negatives] of cos/tau aligned with softmax of
judge/tau by symmetric KL), ``infonce`` (in-batch negatives + optional hard negatives with hard labels: the VLM2Vec
baseline and the "hard negatives only" ablation), ``hybrid`` (soft label + ``infonce_weight`` x in-batch InfoNCE).

GradCache (``gradcache=True``): embed every chunk without gradients, compute the loss on the cached embeddings, then
re-run each chunk with the same random state and back-propagate its embedding gradients. Same gradients as the
plain path, with activation memory of one chunk. Works under DDP, FSDP2 and DeepSpeed ZeRO-1/2 (`trainers.sharding`:
gradients reduced once per optimizer step; tests/test_fsdp.py checks them against one process with the whole batch).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

from .collator import NegativeSelection, UniMEV2Collator
from .common import Choice, JudgeDatasetMixin, LoggedMetricsMixin, inputs_on_device
from .losses import InfoNCELoss, SoftLabelAlignmentLoss
from .sharding import ShardingMixin, fill_missing_gradients


class Loss(Choice):
    """The training objective (`UniMEV2TrainingArguments.loss`)."""

    SOFT_LABEL = "soft_label"
    INFONCE = "infonce"
    HYBRID = "hybrid"


LOSSES = tuple(member.value for member in Loss)


@dataclass
class UniMEV2TrainingArguments(TrainingArguments):
    r"""`TrainingArguments` plus the UniME-V2 objective. The defaults are the paper's (arXiv 2510.13515, implementation
    details) and the authors' code's (``Embedding/src/arguments.py``, ``Embedding/shells/training/train_qwen2vl.sh``).

    Parameters:
        > Objective

        loss (`Loss` or `str`, *optional*, defaults to `"soft_label"`):
            ``soft_label``: the symmetric KL between the embedder's and the judge's distributions over each query's
            1 + k candidates ("MLLM Judgment Based Training Framework"). ``infonce``: hard labels, in-batch negatives
            (plus the mined ones, see ``infonce_hard_negatives``): the VLM2Vec baseline. ``hybrid``: soft label +
            ``infonce_weight`` x in-batch InfoNCE.
        contrastive_temperature (`float`, *optional*, defaults to `0.02`):
            tau, on both distributions (implementation details; ``--temperature 0.02`` in the authors' script).
        infonce_weight (`float`, *optional*, defaults to `0.0`):
            Weight of the in-batch InfoNCE term of ``hybrid``.
        infonce_hard_negatives (`bool`, *optional*, defaults to `True`):
            ``infonce`` also uses the mined negatives.
        infonce_in_batch (`bool`, *optional*, defaults to `True`):
            In-batch negatives for ``infonce``; False is the paper's "hard negatives only" ablation.

        > Negatives

        num_negatives (`int`, *optional*, defaults to `8`):
            k mined negatives per query (of the 10 mined; implementation details, ``select_hard_negative_num 8`` in
            the code).
        negative_selection (`NegativeSelection` or `str`, *optional*, defaults to `"first"`):
            ``first``: the row's first k, the same every epoch (the authors' ``Embedding/src/collator.py``);
            ``random``: k drawn anew each epoch.

        > GradCache

        gradcache (`bool`, *optional*, defaults to `False`):
            Embed in chunks without keeping activations, then replay each chunk for its gradients.
        gradcache_chunk_size (`int`, *optional*, defaults to `2`):
            Rows per chunk (``--gc_q_chunk_size 2 --gc_p_chunk_size 2`` in the authors' script).
        gradcache_reduce_each_chunk (`bool`, *optional*, defaults to `False`):
            Under FSDP2 only. ``False``: gradients are reduce-scattered once per optimizer step, in the last chunk's
            backward; until then every process keeps the unsharded gradients of the trainable parameters (megabytes
            for an adapter; 4 bytes per parameter for a float32 full fine-tune). ``True``: a reduce-scatter after
            every chunk, the gradients stay sharded (for a full fine-tune of a large model; more communication).
            Both give the same gradients (tests/test_fsdp.py).
        deduplicate_inputs (`bool`, *optional*, defaults to `True`):
            Encode an input that occurs several times in a step (the same text and image: a class label shared by
            many queries, a caption mined for several queries) once, within each process, and share its embedding;
            the loss then sees the same rows. Without dropout the gradients equal the plain step's (the shared
            representation gets the sum of its uses' gradients). With dropout the copies share one dropout mask
            instead of drawing their own: still a stochastic gradient of the same loss, under dropout noise that is
            shared between copies (so neither bitwise nor in expectation the plain step's when the loss couples
            the copies). ``False`` encodes every row.

        > Data

        remove_unused_columns (`bool`, *optional*, defaults to `False`):
            The collator reads every column of the judge dataset: keep them.
    """

    loss: Loss = field(
        default=Loss.SOFT_LABEL,
        metadata={"help": "soft_label (the paper's symmetric-KL alignment to the judge) | infonce | hybrid"},
    )
    contrastive_temperature: float = field(default=0.02, metadata={"help": "tau on both distributions (paper: 0.02)"})
    infonce_weight: float = field(default=0.0, metadata={"help": "weight of the in-batch InfoNCE term of 'hybrid'"})
    infonce_hard_negatives: bool = field(default=True, metadata={"help": "'infonce' also uses the mined negatives"})
    infonce_in_batch: bool = field(
        default=True, metadata={"help": "in-batch negatives; False = the paper's 'hard negatives only' ablation"}
    )
    num_negatives: int = field(default=8, metadata={"help": "k negatives per query of the 10 mined (paper: 8)"})
    negative_selection: NegativeSelection = field(
        default=NegativeSelection.FIRST,
        metadata={"help": "first (the row's first k, as the authors trained) | random (a new draw per epoch)"},
    )
    gradcache: bool = field(default=False, metadata={"help": "embed in chunks without activations kept"})
    gradcache_chunk_size: int = field(default=2, metadata={"help": "rows per GradCache chunk (authors' code: 2)"})
    gradcache_reduce_each_chunk: bool = field(default=False, metadata={
        "help": "FSDP2: reduce-scatter the gradients after every GradCache chunk (they stay sharded) instead of "
                "once per step (unsharded trainable gradients kept until then)"})
    deduplicate_inputs: bool = field(default=True, metadata={
        "help": "encode an input that occurs several times in a step (same text, same image) once and share its "
                "embedding; without dropout the gradients are the plain step's"})
    remove_unused_columns: bool = field(default=False, metadata={"help": "the collator needs every column"})

    def __post_init__(self) -> None:
        self.loss = Loss(self.loss)
        self.negative_selection = NegativeSelection(self.negative_selection)
        super().__post_init__()
        if self.gradcache and self.gradcache_chunk_size < 1:
            raise ValueError("gradcache_chunk_size must be >= 1.")


class RandomState:
    """The CPU and CUDA random states at one moment, to replay a forward pass with the same dropout masks."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = (
            torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        )

    @contextlib.contextmanager
    def replay(self):
        devices = list(range(torch.cuda.device_count())) if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state_all(self.cuda)
            yield


def average_gradients(model: torch.nn.Module, world_size: int) -> None:
    """All-reduce the gradients of every trainable parameter (zeros where a process had none) and divide by the
    number of processes: what DDP does, in one flat buffer per dtype."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = defaultdict(list)
    for parameter in model.parameters():
        if parameter.requires_grad:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            by_dtype[parameter.grad.dtype].append(parameter.grad)
    for gradients in by_dtype.values():
        flat = torch.cat([gradient.reshape(-1) for gradient in gradients])
        torch.distributed.all_reduce(flat)
        flat.div_(world_size)
        for gradient, averaged in zip(gradients, flat.split([gradient.numel() for gradient in gradients])):
            gradient.copy_(averaged.view_as(gradient))


class UniMEV2Trainer(ShardingMixin, JudgeDatasetMixin, LoggedMetricsMixin, Trainer):
    """`Trainer` for UniME-V2 embedders on the judge dataset (see the module docstring for the objectives).

    Logged: ``loss_soft_label`` (with ``kl_pq`` and ``kl_qp``) and ``loss_infonce`` (the parts), ``p_positive``
    (mean softmax mass of the positive among each query's candidates), ``judge_agreement`` (how often the model's
    top candidate is the judge's).

    Example:
        >>> from modeling_unime.tiny import build_tiny_unime, synthetic_judge_dataset
        >>> import tempfile
        >>> model, processor = build_tiny_unime("qwen2_vl")
        >>> image_root = tempfile.mkdtemp()
        >>> rows = synthetic_judge_dataset(8, image_root, num_negatives=4)
        >>> args = UniMEV2TrainingArguments(tempfile.mkdtemp(), max_steps=2, per_device_train_batch_size=4,
        ...     num_negatives=4, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
        >>> trainer = UniMEV2Trainer(model=model, args=args, train_dataset=rows, processing_class=processor,
        ...                          image_root=image_root)
        >>> result = trainer.train()  # doctest: +ELLIPSIS
        {...}
        >>> result.global_step
        2
    """

    # The loss of a micro-batch is a mean over its own queries, not yet divided by the gradient accumulation steps:
    # Trainer.training_step divides it (GradCache: ``gradcache_step(scale=1 / steps)``), so that batch 4 x 1 step and
    # batch 2 x 2 steps give the same gradients (tests/test_embedding_trainer.py, gradient accumulation). Said
    # explicitly rather than left to the Trainer's guess from ``num_items_in_batch``.
    loss_is_scaled_for_ga = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.check_deepspeed(coalesced=True)  # every step goes through deepspeed_step
        self.soft_label_loss = SoftLabelAlignmentLoss(self.args.contrastive_temperature)
        self.infonce_loss = InfoNCELoss(
            self.args.contrastive_temperature, hard_negatives_only=not self.args.infonce_in_batch
        )

    def make_collator(self, args: UniMEV2TrainingArguments, processor: Any, **images: Any) -> UniMEV2Collator:
        return UniMEV2Collator(
            processor, num_negatives=args.num_negatives, negative_selection=args.negative_selection, seed=args.seed,
            chunk_size=args.gradcache_chunk_size if args.gradcache else None, deduplicate=args.deduplicate_inputs,
            **images,
        )

    # ------------------------------------------------------------------------------------------------- objective

    def objective(
        self, query_embeddings: torch.Tensor, candidate_embeddings: torch.Tensor, judge_scores: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of one batch from its embeddings, and the values to log."""
        batch, width = judge_scores.shape
        candidates = candidate_embeddings.view(batch, width, -1)
        similarities = torch.einsum("bd,bkd->bk", query_embeddings, candidates)
        loss_name = Loss(self.args.loss)
        metrics: dict[str, torch.Tensor] = {}
        loss = similarities.new_zeros(())
        if width > 1:
            soft = self.soft_label_loss.parts(similarities, judge_scores)
            metrics.update(
                p_positive=soft["p_positive_mean"], judge_agreement=soft["judge_agreement"], kl_pq=soft["kl_pq"],
                kl_qp=soft["kl_qp"], loss_soft_label=soft["loss"].detach(),
            )
            if loss_name in (Loss.SOFT_LABEL, Loss.HYBRID):
                loss = soft["loss"]
        elif loss_name != Loss.INFONCE:
            raise ValueError(f"loss={loss_name.value!r} needs at least one negative per query (num_negatives >= 1).")
        if loss_name in (Loss.INFONCE, Loss.HYBRID):
            use_hard = loss_name == Loss.INFONCE and self.args.infonce_hard_negatives and width > 1
            contrastive = self.infonce_loss(query_embeddings, candidates[:, 0], candidates[:, 1:] if use_hard else None)
            metrics["loss_infonce"] = contrastive.detach()
            loss = contrastive if loss_name == Loss.INFONCE else loss + self.args.infonce_weight * contrastive
        return loss, metrics

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        embeddings = every_input(torch.cat([model(**chunk).embeddings for chunk in inputs["chunks"]]), inputs)
        query_embeddings, candidate_embeddings = (
            embeddings[: inputs["num_queries"]],
            embeddings[inputs["num_queries"] :],
        )
        loss, metrics = self.objective(query_embeddings, candidate_embeddings, inputs["judge_scores"])
        self._record(metrics)
        return (
            (loss, {"query_embeddings": query_embeddings, "candidate_embeddings": candidate_embeddings})
            if return_outputs
            else loss
        )

    # ------------------------------------------------------------------------------------------------- GradCache

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.is_deepspeed_enabled:
            model.train()
            return self.deepspeed_step(model, inputs_on_device(inputs, self.args.device))
        if not self.args.gradcache:
            return super().training_step(model, inputs, num_items_in_batch)
        if self.is_fsdp_enabled:
            self.prepare_sharded_model(model)
        model.train()
        inputs = inputs_on_device(inputs, self.args.device)
        return self.gradcache_step(model, inputs, scale=1.0 / self.current_gradient_accumulation_steps)

    def deepspeed_step(self, engine: Any, inputs: dict[str, Any]) -> torch.Tensor:
        """One step under DeepSpeed ZeRO-1/2, with or without GradCache: every backward accumulates locally inside
        DeepSpeed's ``coalesce_grad_reduction``, every trainable parameter gets a gradient (zero where this process
        had none), and one reduction over all of them, in the same order on every process, precedes the step."""
        with engine.coalesce_grad_reduction():
            if self.args.gradcache:
                loss = self.gradcache_step(engine, inputs)
            else:
                with self.compute_loss_context_manager():
                    loss = self.compute_loss(engine, inputs)
                engine.backward(loss, scale_wrt_gas=False)
                loss = loss.detach()
            fill_missing_gradients(engine.module)
        if self.accelerator.sync_gradients:
            engine.step()
        return loss

    def gradcache_step(self, model: torch.nn.Module, inputs: dict[str, Any], scale: float = 1.0) -> torch.Tensor:
        """One GradCache step: returns the (unscaled) loss; parameter gradients are accumulated into ``.grad``."""
        chunks = inputs["chunks"]
        sharded = self.is_fsdp_enabled
        # Under FSDP every forward gathers weights with the other processes: all must run as many forwards, so a
        # process with fewer distinct inputs replays its last chunk with a zero gradient.
        forwards = chunks + [chunks[-1]] * self.missing_forwards(len(chunks)) if sharded else chunks
        states, cached = [], []
        with torch.no_grad(), self.compute_loss_context_manager():
            for chunk in forwards:
                states.append(RandomState())
                cached.append(model(**chunk).embeddings)
        cached = [embeddings.detach().requires_grad_() for embeddings in cached]
        with self.compute_loss_context_manager():
            # the gather's backward sums a shared input's gradients into its one cached leaf
            embeddings = every_input(torch.cat(cached[: len(chunks)]), inputs)
            queries = inputs["num_queries"]
            loss, metrics = self.objective(embeddings[:queries], embeddings[queries:], inputs["judge_scores"])
        if self.is_deepspeed_enabled:  # accelerate's DeepSpeed backward would also step the engine
            (loss * scale).backward()
        else:
            self.accelerator.backward(loss * scale)
        if sharded:
            # FSDP2 reduce-scatters (and averages over processes) in the backward of the last chunk only, unless
            # told to after each chunk, and only at the end of an accumulation: until then the chunks accumulate
            # unsharded gradients.
            last = len(forwards) - 1
            each_chunk = self.args.gradcache_reduce_each_chunk
            for index, (chunk, state, embeddings) in enumerate(zip(forwards, states, cached)):
                model.set_requires_gradient_sync(self.accelerator.sync_gradients and (each_chunk or index == last))
                self.replay_chunk(model, chunk, state, embeddings)
            model.set_requires_gradient_sync(True)
        elif self.is_deepspeed_enabled:  # inside deepspeed_step's coalesce_grad_reduction: reduced after the step
            for chunk, state, embeddings in zip(forwards, states, cached):
                self.replay_chunk(model, chunk, state, embeddings)
        else:
            # Every chunk back-propagates locally; gradients are then averaged over the processes once. A DDP-synced
            # last chunk would not do: a text-only chunk leaves the vision tower without gradients and DDP refuses
            # that.
            with self.accelerator.no_sync(model):
                for chunk, state, embeddings in zip(forwards, states, cached):
                    self.replay_chunk(model, chunk, state, embeddings)
            if self.accelerator.num_processes > 1 and self.accelerator.sync_gradients:
                average_gradients(model, self.accelerator.num_processes)
        self._record(metrics)
        return loss.detach() * scale

    def replay_chunk(
        self, model: torch.nn.Module, chunk: dict[str, Any], state: RandomState, cached: torch.Tensor
    ) -> None:
        """Re-run one chunk under the random state of its first pass and back-propagate its cached gradient (zero
        for a chunk the loss did not read)."""
        with state.replay(), self.compute_loss_context_manager():
            replayed = model(**chunk).embeddings
        gradient = cached.grad if cached.grad is not None else torch.zeros_like(replayed)
        torch.autograd.backward(replayed, grad_tensors=gradient)

    def missing_forwards(self, count: int) -> int:
        """How many forwards this process runs fewer than the process with the most chunks in this step."""
        if self.accelerator.num_processes == 1:
            return 0
        counts = self.accelerator.gather(torch.tensor([count], device=self.args.device))
        return int(counts.max()) - count


def every_input(embeddings: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
    """The embeddings of every row of the step ([queries, candidates of each query]) from those of its distinct inputs
    (``input_index``, written by a de-duplicating collator); as they are without one."""
    index = inputs.get("input_index")
    return embeddings if index is None else embeddings.index_select(0, index.to(embeddings.device))


__all__ = ["LOSSES", "Loss", "RandomState", "UniMEV2Trainer", "UniMEV2TrainingArguments", "average_gradients",
           "every_input"]
