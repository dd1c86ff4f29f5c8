"""The training loop: DeepSpeed engine steps, aux losses, evaluation per domain, checkpoints, metrics."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..data import DataConfig, build_loader, merge_states
from ..mole.collect import aux_losses, routing_counts_by_sample
from ..parallel import all_to_all_bytes
from ..patching import mole_layers
from ..runtime import barrier, rank, world_size
from ..checkpoint import client_states, find_resume
from .checkpoint import load_checkpoint, save_checkpoint, save_training_checkpoint
from .config import RunConfig
from .engine import ds_stage, expert_bytes, setup_training
from .faults import StopSignal
from .step import exact_match_step, forward, train_step
from .metrics import MetricsWriter, RoutingTracker, token_slots, write_routing_report
from .zero3 import VisionSync


def _data_config(cfg: RunConfig, urls: list[str], micro_batch: int, eval_mode: bool) -> DataConfig:
    """A loader's config: the run's data options (the data layer's schema, so no field is mapped by hand) with
    the sources and DeepSpeed's micro-batch; held-out reading is the data layer's DataConfig.for_eval."""
    data = DataConfig(urls=urls, batch_size=micro_batch, **cfg.data.options())
    return data.for_eval(urls) if eval_mode else data


class Trainer:
    """One training run (every rank builds one). ``run()`` returns the summary dict (also in summary.json)."""

    def __init__(self, cfg: RunConfig, ds: dict, progress: bool = True) -> None:
        self.cfg, self.ds = cfg, ds
        self.rank, self.world = rank(), world_size()
        self.out = Path(cfg.train.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.setup = setup_training(cfg, ds, base_dir=self.out / "base_model")
        # The run as it runs: the caller's config with what setup resolved (mole.ep_size 'auto' -> a number).
        self.cfg = dataclasses.replace(cfg, mole=self.setup.mole)
        self.engine = self.setup.engine
        self.model = self.engine.module
        self.micro = int(ds["train_micro_batch_size_per_gpu"])
        self.accum = int(ds.get("gradient_accumulation_steps", 1))
        if not cfg.data.train:
            raise ValueError("data.train is empty: give shard URLs, a folder of shards or a manifest.json")
        self.loader = build_loader(_data_config(cfg, cfg.data.train, self.micro, False), self.setup.processor)
        self._eval_cfg = _data_config(cfg, cfg.data.eval, self.micro, True) if cfg.data.eval else None
        # Built now so a bad eval source fails before training; rebuilt for every evaluation, so each one
        # reads the held-out set from its start whatever the previous one consumed.
        self.eval_loader = build_loader(self._eval_cfg, self.setup.processor) if self._eval_cfg else None
        self.domains = self.loader.domain_names
        self.vision_sync = VisionSync(self.model) if (ds_stage(ds) == 3 and hasattr(self.model, "model")
                                                     and hasattr(self.model.model, "vision_tower")) else None
        n_layers = len(mole_layers(self.model))
        self.has_mole = n_layers > 0
        self.routing = RoutingTracker(n_layers, cfg.mole.num_experts, self.domains)
        self.metrics = MetricsWriter(self.out, enabled=self.rank == 0)
        self.progress = progress and self.rank == 0
        self.step = 0
        self._it = None
        self.stop: StopSignal | None = None

    def close(self) -> None:
        """Release what the run holds (data loader workers, metrics files, signal handlers); idempotent."""
        self._close_data()
        self.metrics.close()
        if self.stop is not None:
            self.stop.close()
            self.stop = None

    # -- data ------------------------------------------------------------------------------------------
    def _next_batch(self) -> dict:
        while True:
            if self._it is None:
                self._it = iter(self.loader)
            try:
                return next(self._it)
            except StopIteration:
                self._it = None  # next epoch (the loader advanced its epoch counter)

    def _forward(self, batch: dict):
        return forward(self.engine, batch, self.vision_sync)

    def _close_data(self) -> None:
        # A suspended epoch iterator keeps its DataLoader workers alive; closing it shuts them down through
        # the DataLoader's own protocol. Left to interpreter exit, they would be stopped with SIGTERM, which
        # the workers leave to the trainer (mole_ds.data.loader) - and the exit would wait on them forever.
        if self._it is not None:
            self._it.close()
            self._it = None

    # -- checkpoints -----------------------------------------------------------------------------------
    def _meta(self) -> dict:
        # "export_extra" and "param_dtype": what tools/consolidate.py needs to rebuild the tag's mole.safetensors
        # (tensors and metadata) from the DeepSpeed files alone.
        dtype = next((p.dtype for p in self.model.parameters() if p.requires_grad), torch.float32)
        return {"ep_size": self.cfg.mole.ep_size, "world_size": self.world, "num_experts": self.cfg.mole.num_experts,
                "mole": self.cfg.mole.to_dict(), "param_dtype": str(dtype).removeprefix("torch."),
                "export_extra": self._export_extra()}

    def _export_extra(self) -> dict:
        return {"base_model": self.base_model_path(), "run_config": self.cfg.to_dict(), "domains": self.domains}

    def base_model_path(self) -> str:
        return self.cfg.model.path or str((self.out / "base_model").resolve())

    def save(self) -> Path:
        """DeepSpeed checkpoint (resumable) + ``mole.safetensors`` in it (consolidated, loadable anywhere)."""
        client = {"step": self.step, "data": self._data_state(), "routing": self.routing.counts.tolist()}
        if self.cfg.model.train_base:
            tag = save_checkpoint(self.engine, self.ckpt_root, self.step, client, self._meta(),
                                  keep=self.cfg.checkpoint.keep)
            if self.rank == 0:  # ZeRO 0-2 keep full weights on every rank
                self.model.save_pretrained(tag / "model")
                self.setup.processor.save_pretrained(tag / "model")
            barrier()
            return tag
        ep_group = self.setup.ep.ep_group if self.setup.ep is not None else None
        return save_training_checkpoint(self.engine, self.ckpt_root, self.step, client, self._meta(), self.cfg.mole,
                                        ep_group, keep=self.cfg.checkpoint.keep,
                                        extra=self._export_extra())

    def _data_state(self) -> dict:
        """The run's data position: every rank's streams, merged (so any world size can resume it, and a ZeRO
        stage that keeps only rank 0's client state still holds every rank's position)."""
        return merge_states(self._gather(self.loader.state_dict()))

    def _gather(self, obj) -> list:
        """``obj`` of every rank, in rank order (collective)."""
        if not dist.is_initialized() or self.world == 1:
            return [obj]
        every: list = [None] * self.world
        dist.all_gather_object(every, obj)
        return every

    def maybe_resume(self) -> None:
        tag = find_resume(self.cfg.checkpoint.resume, self.ckpt_root)
        if tag is None:
            return
        client = load_checkpoint(self.engine, tag, self.cfg.mole.ep_size, self.world, self.cfg.mole.num_experts)
        self.step = int(client["step"])
        self.loader.load_state_dict(client["data"])
        self.routing.counts = torch.tensor(client["routing"], dtype=torch.float64)
        if "resharded_from" in client:
            # Another world size: the counts are per rank (summed at the end), so rank 0 carries the old ranks'
            # total and the others start at zero.
            self.routing.counts = self._old_routing_total(tag) if self.rank == 0 else torch.zeros_like(self.routing.counts)
        self.metrics.truncate_after(self.step)  # steps after the checkpoint are re-run: their old records go
        if self.rank == 0:
            print(f"[mole_ds] resumed from {tag} at step {self.step}", flush=True)

    @staticmethod
    def _old_routing_total(tag: Path) -> torch.Tensor:
        return sum(torch.tensor(sd["routing"], dtype=torch.float64) for sd in client_states(tag))

    # -- evaluation ------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        if self.eval_loader is None:
            return {}
        self.engine.eval()
        self.eval_loader = build_loader(self._eval_cfg, self.setup.processor)
        names = self.eval_loader.domain_names
        # Per domain: (loss * tokens, tokens, exact matches, samples scored).
        sums = torch.zeros(len(names), 4, dtype=torch.float64)
        em_tokens = self.cfg.train.eval_exact_match_tokens
        it = iter(self.eval_loader)
        n = len(self.eval_loader) if self.cfg.train.eval_batches <= 0 else min(self.cfg.train.eval_batches, len(self.eval_loader))
        for _ in range(n):
            batch = next(it)
            out = self._forward(batch)
            logits = out.logits[:, :-1].float()
            labels = batch["labels"][:, 1:].to(logits.device)
            tok_loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100,
                                                         reduction="none")
            valid = (labels != -100).to(torch.float64)
            dom = batch["domain_ids"].tolist()
            for b, d in enumerate(dom):
                sums[d, 0] += float((tok_loss[b].double() * valid[b]).sum())
                sums[d, 1] += float(valid[b].sum())
            if em_tokens > 0:
                # Greedy answers vs the first reference reply (every rank decodes in step: synced generation).
                correct = exact_match_step(self.model, self.setup.processor, batch, em_tokens, self.vision_sync)
                for ok, d in zip(correct, dom):
                    sums[d, 2] += float(ok)
                    sums[d, 3] += 1.0
        it.close()  # shuts its DataLoader workers down now (see _close_data)
        if dist.is_initialized():
            dist.all_reduce(sums)
        self.engine.train()
        res = {f"loss/{n}": float(sums[i, 0] / sums[i, 1]) for i, n in enumerate(names) if sums[i, 1] > 0}
        if sums[:, 1].sum() > 0:
            res["loss/all"] = float(sums[:, 0].sum() / sums[:, 1].sum())
        res.update({f"exact_match/{n}": float(sums[i, 2] / sums[i, 3]) for i, n in enumerate(names) if sums[i, 3] > 0})
        if sums[:, 3].sum() > 0:
            res["exact_match/all"] = float(sums[:, 2].sum() / sums[:, 3].sum())
        return res

    # -- the loop --------------------------------------------------------------------------------------
    def run(self) -> dict:
        from tqdm import tqdm

        cfg = self.cfg
        self.maybe_resume()
        # SIGINT/SIGTERM: stop at the next step boundary with a final checkpoint, on every rank; a rank that
        # cannot reach it (blocked on a stuck peer) exits with status 1 after the grace period.
        stop = self.stop = StopSignal(cfg.train.stop_grace_s, self.rank)
        bar = tqdm(total=cfg.train.max_steps, initial=self.step, disable=not self.progress, dynamic_ncols=True,
                   desc="train")
        self.engine.train()
        t_start = time.perf_counter()
        first_step = self.step
        last_logged = self.step
        all_to_all_bytes(self.model)  # count from this run's first step
        end = cfg.train.max_steps if cfg.train.run_steps <= 0 else min(cfg.train.max_steps, self.step + cfg.train.run_steps)
        last_eval: dict = {}
        step_times: list[float] = []
        interrupted = False
        while self.step < end:
            t0 = time.perf_counter()
            observe = ((lambda batch, out: self.routing.add(routing_counts_by_sample(self.model), batch["domain_ids"]))
                       if self.has_mole else None)
            batches = [self._next_batch() for _ in range(self.accum)]
            rec_step = train_step(self.engine, batches, vision_sync=self.vision_sync, observe=observe)
            self.step += 1
            if cfg.train.log_sample_ids:
                self._log_sample_ids([i for b in batches for i in b["ids"]])
            dt = time.perf_counter() - t0
            step_times.append(dt)
            stop.note_step(dt)
            if self.step % cfg.train.log_every == 0 or self.step == cfg.train.max_steps:
                load, balance = 0.0, 0.0
                if self.has_mole:
                    counts = torch.stack([m.last_stats.count_BE.sum(0) for m in mole_layers(self.model)]).sum(0)
                    load = float(counts.max() / counts.mean().clamp_min(1e-9)) if counts.sum() > 0 else 0.0
                    balance = float(aux_losses(self.model)["balance"].detach())
                loss, aux = rec_step.global_means()
                # Expert all-to-all bytes to other ranks: per step, averaged over the steps since the last record.
                a2a = {k: v / max(1, self.step - last_logged) for k, v in all_to_all_bytes(self.model).items()}
                last_logged = self.step
                real, slots = token_slots(batches)  # this step's micro-batches on all ranks
                rec = {"loss": loss, "aux_loss": aux, "balance": balance,
                       "lr": self.setup.scheduler.get_last_lr()[0], "tokens_per_s": rec_step.tokens * self.world / dt,
                       "real_tokens_per_s": real / dt, "pad_fraction": 1.0 - real / max(slots, 1),
                       "step_s": dt, "expert_load_max_over_mean": load, **a2a}
                self.metrics.log(self.step, "train", rec)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", aux=f"{rec['aux_loss']:.4f}",
                                tok_s=f"{rec['tokens_per_s']:.0f}", load=f"{load:.2f}")
            bar.update(1)
            if cfg.train.eval_every and self.step % cfg.train.eval_every == 0:
                last_eval = self.evaluate()
                self.metrics.log(self.step, "eval", last_eval)
                all_to_all_bytes(self.model)  # evaluation traffic is not training traffic: drop it
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < end:
                self.save()
            if stop.agreed():
                interrupted = True
                stop.reached_boundary()
                break
        bar.close()
        self._close_data()
        ckpt = self.save()
        # A periodic evaluation at this very step (in this invocation) doubles as the final one.
        evaluated_now = bool(cfg.train.eval_every) and self.step % cfg.train.eval_every == 0 and self.step > first_step
        if not interrupted and self.step == cfg.train.max_steps and not evaluated_now:
            last_eval = self.evaluate()
            self.metrics.log(self.step, "eval", last_eval)
        counts = self.routing.reduce()
        summary = self._summary(ckpt, last_eval, counts, step_times, time.perf_counter() - t_start,
                                self.step - first_step, interrupted)
        if self.rank == 0:  # every run kind writes its summary; routing only where there is routing
            if self.has_mole:
                write_routing_report(counts, self.domains, self.out,
                                     title=f"MoLE routing ({cfg.mole.num_experts} experts, step {self.step})")
            (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
        self.close()
        return summary

    def _log_sample_ids(self, ids: list[str]) -> None:
        self.metrics.log(self.step, "samples", {"ids": [i for r in self._gather(ids) for i in r]})

    def _data_stats(self) -> tuple[dict, list[str]]:
        """Skip and fault counts summed over ranks (fixed key order, one all-reduce), and the skip-fraction
        warning of the whole run if any (a fraction above data.max_skip_fraction has already stopped it)."""
        from ..data import STAT_KEYS, check_skip_fraction

        local = dict(self.loader.stats)
        t = torch.tensor([float(local.get(k, 0)) for k in STAT_KEYS], dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(t)
        stats = {k: int(v) for k, v in zip(STAT_KEYS, t.tolist()) if v}
        # A counter outside the fixed list (none today) is reported as this rank's own.
        stats.update({f"rank{self.rank}/{k}": int(v) for k, v in local.items() if k not in STAT_KEYS and v})
        warnings = []
        try:
            w = check_skip_fraction(stats, self.cfg.data.max_skip_fraction, "all ranks", final=True)
        except Exception as exc:  # noqa: BLE001 - the run is over: report it rather than lose the summary
            w = str(exc).splitlines()[0]
        if w:
            warnings.append(w)
        return stats, warnings

    def _summary(self, ckpt, evals, counts, step_times, wall, steps, interrupted) -> dict:
        ex, other = expert_bytes(self.model)
        st = sorted(step_times)
        data_stats, warnings = self._data_stats()
        return {
            "steps": self.step, "steps_this_run": steps, "interrupted": interrupted, "wall_s": round(wall, 2),
            "median_step_s": st[len(st) // 2] if st else None, "checkpoint": str(ckpt),
            "world_size": self.world, "ep_size": self.cfg.mole.ep_size, "zero_stage": ds_stage(self.ds),
            "eval": evals, "routing_tokens_per_expert": counts.sum((0, 1)).tolist(),
            "expert_param_bytes_per_rank": ex, "other_param_bytes_per_rank": other,
            "patch": str(self.setup.report), "data_stats": data_stats, "warnings": warnings,
        }
