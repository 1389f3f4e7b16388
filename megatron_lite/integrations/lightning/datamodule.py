"""LightningDataModule over our datasets and DP sampler (same samples, order and resume point).

The train/valid datasets are ``megatron_lite.data.build_train_valid_test_datasets`` with the
sample counts ``pretrain_llama.py`` asks for (train_iters x GB train samples; eval_iters x micro
batch x D validation samples when evaluation is on), and the loaders are
``megatron_lite.data.build_data_loader``: ``MegatronPretrainingSampler`` shards each global
micro-batch over the DP ranks, so rank r of D reads exactly what it reads under our trainer.
Lightning must therefore not add its own ``DistributedSampler``: the Trainer is built with
``use_distributed_sampler=False`` (:func:`build_trainer` does this; a Trainer without it is
refused at ``setup``). Resume: the loader starts at ``consumed_samples = global_step x GB``
(Lightning restores ``global_step`` before it asks for the loader), and a blended train set's
per-source counts travel in the Lightning checkpoint through :meth:`state_dict`.
"""

from __future__ import annotations

import lightning as L


class MegatronDataModule(L.LightningDataModule):
    """Our packed GPT datasets and DP-sharded samplers as a LightningDataModule.

    Args:
        cfg: finalized :class:`~megatron_lite.config.RunConfig` (``data`` section with
            ``--data-path`` or ``--train-data-path``).

    Raises:
        ValueError: no data path (at construction), or a Trainer that would re-shard the
            batches with a DistributedSampler (at :meth:`setup`).
    """

    def __init__(self, cfg):
        super().__init__()
        dc = cfg.data
        if not (dc.data_path or dc.train_data_path):
            raise ValueError("no training data: set data.path (or --data-path PREFIX); make "
                             "PREFIX_text_document.bin/.idx with tools/preprocess_data.py")
        self.cfg = cfg
        self.train_ds = self.valid_ds = None
        self._data_state: dict | None = None

    def _dp(self) -> tuple[int, int]:
        # TP = 1 under Lightning: DP rank/size are the global ones
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def setup(self, stage: str | None = None) -> None:
        """Build the train and validation datasets (every rank; index files are cached)."""
        t = self.trainer
        if t is not None and getattr(t._accelerator_connector, "use_distributed_sampler", False):
            raise ValueError("build the Trainer with use_distributed_sampler=False (or with "
                             "megatron_lite.integrations.lightning.build_trainer): our sampler "
                             "already shards every micro-batch over the data-parallel ranks")
        if self.train_ds is not None:
            return
        from megatron_lite.data import build_train_valid_test_datasets
        from megatron_lite.data.tokenizer import build_tokenizer

        cfg, d, dc, ev = self.cfg, self.cfg.derived, self.cfg.data, self.cfg.eval
        eod = None
        if dc.tokenizer_model:
            eod = build_tokenizer(dc.tokenizer_type or "SentencePieceTokenizer",
                                  dc.tokenizer_model).eod
        valid = (ev.eval_iters * cfg.training.micro_batch_size * d.data_parallel_size) \
            if ev.eval_interval else 0
        self.train_ds, self.valid_ds, _ = build_train_valid_test_datasets(
            dc, cfg.model.seq_length, (d.train_iters * d.global_batch_size, valid, 0),
            cfg.training.seed, eod)
        if self._data_state is not None:
            self._apply_state()

    def consumed_samples(self) -> int:
        """Global training samples consumed so far: optimizer steps x GB."""
        step = self.trainer.global_step if self.trainer is not None else 0
        return step * self.cfg.derived.global_batch_size

    def train_dataloader(self):
        """This rank's micro-batches ``{tokens, labels, loss_mask, position_ids [b, s], ...}``."""
        from megatron_lite.data import build_data_loader

        rank, size = self._dp()
        # Same loader as pretrain_llama.py: its own seeded generator, and token ids checked
        # against --vocab-size (a clear error instead of an IndexError in the embedding).
        return build_data_loader(self.train_ds, self.consumed_samples(),
                                 self.cfg.training.micro_batch_size, rank, size,
                                 num_workers=self.cfg.data.num_workers,
                                 seed=self.cfg.training.seed,
                                 vocab_size=self.cfg.model.vocab_size)

    def val_dataloader(self):
        """The first ``eval_iters`` micro-batches of the validation split (every evaluation)."""
        from megatron_lite.data import build_data_loader

        if self.valid_ds is None:
            return []
        rank, size = self._dp()
        return build_data_loader(self.valid_ds, 0, self.cfg.training.micro_batch_size, rank,
                                 size, num_workers=0, seed=self.cfg.training.seed + 1,
                                 vocab_size=self.cfg.model.vocab_size)

    def state_dict(self) -> dict:
        """``{"consumed_samples", "data_state"}`` (blended per-source counts, or None)."""
        consumed = self.consumed_samples()
        state = None
        if self.train_ds is not None and hasattr(self.train_ds, "state_dict"):
            state = self.train_ds.state_dict(consumed)
        return {"consumed_samples": consumed, "data_state": state}

    def load_state_dict(self, state: dict) -> None:
        """Restore a blended train set's per-source counts (applied once the set exists)."""
        self._data_state = state.get("data_state")
        if self.train_ds is not None and self._data_state is not None:
            self._apply_state()

    def _apply_state(self) -> None:
        if hasattr(self.train_ds, "load_state_dict"):
            self.train_ds.load_state_dict(self._data_state)
        self._data_state = None
