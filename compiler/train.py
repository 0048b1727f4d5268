"""`moec train`: a short training run of a generated model on synthetic multimodal data.

The data: random hidden states `x [batch, seq, d]` with random modality tags (and, for a model
that routes by task, random task ids), and a regression target produced by a fixed random teacher
per modality (`tanh(x A_m) B_m`, scaled and shifted per task: `* s_t + c_t`), so a model that
routes modalities (and tasks) well can fit it. Loss = MSE + the model's auxiliary loss.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch


@dataclass
class StepStats:
    step: int
    loss: float
    aux_loss: float
    balance: float  # max / mean tokens per expert, averaged over MoE layers (1.0 = perfectly even)


def load_balance_ratio(expert_counts: list) -> float:
    ratios = []
    for counts in expert_counts:
        c = counts.float()
        if c.sum() > 0:
            ratios.append(float(c.max() / c.mean()))
    return sum(ratios) / len(ratios) if ratios else 1.0


class SyntheticTask:
    """`tasks`: how many task ids the model takes (None: it takes none, and batches carry None)."""

    def __init__(self, d_model: int, num_modalities: int, seed: int, tasks: int | None = None):
        g = torch.Generator().manual_seed(seed)
        self.g = g
        self.d, self.m, self.tasks = d_model, num_modalities, tasks
        self.a = torch.randn(num_modalities, d_model, d_model, generator=g) / d_model ** 0.5
        self.b = torch.randn(num_modalities, d_model, d_model, generator=g) / d_model ** 0.5
        if tasks is not None:
            self.scale = 1 + 0.5 * torch.randn(tasks, d_model, generator=g)
            self.shift = 0.5 * torch.randn(tasks, d_model, generator=g)

    def batch(self, batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(x, modality, task, target); task is None when the model takes no task ids."""
        x = torch.randn(batch, seq, self.d, generator=self.g)
        modality = torch.randint(0, self.m, (batch, seq), generator=self.g)
        task = None if self.tasks is None else torch.randint(0, self.tasks, (batch, seq), generator=self.g)
        target = torch.empty_like(x)
        for m in range(self.m):  # one GEMM pair per modality (not a [d, d] matrix gathered per token)
            rows = modality == m
            target[rows] = torch.tanh(x[rows] @ self.a[m]) @ self.b[m]
        if task is not None:
            target = target * self.scale[task] + self.shift[task]
        return x, modality, task, target


def _check_lr(lr: float) -> None:
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"the learning rate must be a finite number > 0, got {lr!r}")


def train(model, steps: int = 50, tokens: int = 512, seq: int = 64, lr: float = 3e-3, seed: int = 0,
          log=None, every: int = 1, tasks: int | None = None):
    """Train `model` for `steps` steps; call `log(StepStats)` every `every` steps; return all stats.

    `tasks`: for a model that routes by task, how many task ids it takes (`moec.driver.task_count`);
    the batch then carries random task ids. Training stops after the first step whose loss is
    not finite (the last entry of the history then shows it)."""
    _check_lr(lr)
    torch.manual_seed(seed)
    seq = max(1, min(seq, tokens))
    batch = max(1, tokens // seq)
    data = SyntheticTask(model.d_model, len(model.modalities), seed, tasks)
    x, modality, task, target = data.batch(batch, seq)  # one fixed batch: the loss must be able to go down
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    history: list[StepStats] = []
    first = model(x[:1], modality[:1], None if task is None else task[:1])
    routed = [torch.zeros_like(c) for c in first.expert_counts]
    for step in range(1, steps + 1):
        out = model(x, modality, task)
        mse = torch.nn.functional.mse_loss(out.output, target)
        loss = mse + out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.after_step()
        for acc, c in zip(routed, out.expert_counts):
            acc += c.detach()
        stats = StepStats(step, float(mse.detach()), float(out.aux_loss.detach()), load_balance_ratio(out.expert_counts))
        history.append(stats)
        diverged = not math.isfinite(stats.loss + stats.aux_loss)
        if log is not None and (step % every == 0 or step == steps or step == 1 or diverged):
            log(stats)
        if diverged:
            break
    return history, routed


def _profile_error(profile: str) -> str | None:
    """Why the routing profile cannot be written to `profile` (None: it can). Probes by opening it
    for appending, which leaves an existing file unchanged; a file the probe created is removed."""
    if os.path.isdir(profile):
        return f"cannot write the routing profile `{profile}`: it is a directory"
    parent = os.path.dirname(os.path.abspath(profile))
    if not os.path.isdir(parent):
        return f"cannot write the routing profile `{profile}`: no directory `{os.path.dirname(profile) or parent}`"
    existed = os.path.lexists(profile)
    try:
        with open(profile, "a"):
            pass
    except OSError as exc:
        return f"cannot write the routing profile `{profile}`: {exc.strerror or exc}"
    if not existed:
        os.unlink(profile)
    return None


def _memory_error(comp, tokens: int, seq: int) -> str | None:
    """A run whose batch and kept activations alone exceed this machine's memory: why (else None)."""
    from moec.api import _physical_memory

    memory = _physical_memory()
    if memory is None:
        return None
    per_token = 2 * 4 * comp.spec.dim + max(comp.results["analysis"]["activation_bytes_per_token"].values(),
                                           default=0)  # x and the target, then the activations
    seq = max(1, min(seq, tokens))
    need = per_token * max(1, tokens // seq) * seq  # the tokens `train` uses
    if need <= memory:
        return None
    return (f"--tokens {tokens:,} needs at least {need / 2**30:,.1f} GiB for the batch and the activations "
            f"kept for the backward pass ({per_token:,} bytes per token), more than this machine's "
            f"{memory / 2**30:,.1f} GiB of memory; give fewer --tokens")


def run_cli(path: str, steps: int, tokens: int, seq: int, lr: float, seed: int, profile: str | None,
            plan: str | None = None) -> int:
    try:
        _check_lr(lr)
    except ValueError as exc:
        print(f"moec: error: {exc}", file=sys.stderr)
        return 1
    if plan is not None:
        return _run_expert_parallel(path, steps, tokens, seq, lr, seed, plan)
    import moec
    from moec.driver import compile_model, task_count

    problem = _profile_error(profile) if profile else None  # before training, not after it
    if problem:
        print(f"moec: error: {problem}", file=sys.stderr)
        return 1
    comp = compile_model(path)
    model = moec.load(path, seed=seed)
    problem = _memory_error(comp, tokens, seq)
    if problem:
        print(f"moec: error: {problem}", file=sys.stderr)
        return 1
    tasks = task_count(comp.graph)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"training {path}: {n_params:,} parameters, {steps} steps of {tokens} tokens "
          f"(modalities: {', '.join(model.modalities)}" + (f"; task ids 0..{tasks - 1})" if tasks else ")"))
    schedules = [(name, m) for name, m in model.named_modules() if hasattr(m, "advance")]
    for name, schedule in schedules:
        print(f"schedule {name}: {schedule.extra_repr()}")
    tty = sys.stdout.isatty()
    start = time.perf_counter()

    def log(s: StepStats) -> None:
        width = 24
        done = int(width * s.step / steps)
        bar = "#" * done + "." * (width - done)
        rate = s.step / max(time.perf_counter() - start, 1e-9)
        scheduled = "".join(f"  {name.rsplit('.', 1)[-1]} {m():.3g}" for name, m in schedules[:1])
        line = (f"[{bar}] step {s.step:>4}/{steps}  loss {s.loss:.5f}  aux {s.aux_loss:.5f}  "
                f"load max/mean {s.balance:.2f}{scheduled}  {rate:.1f} step/s")
        print("\r" + line if tty else line, end="" if tty and s.step != steps else "\n", flush=True)

    try:
        history, routed = train(model, steps, tokens, seq, lr, seed, log, every=1 if tty else max(1, steps // 10),
                                tasks=tasks)
    except (MemoryError, RuntimeError) as exc:  # torch's allocator failing says so in a RuntimeError
        if not isinstance(exc, MemoryError) and "alloc" not in str(exc).lower():
            raise
        print(f"\nmoec: error: out of memory training with --tokens {tokens:,}: {str(exc).strip() or 'MemoryError'}"
              "; give fewer --tokens", file=sys.stderr)
        return 1
    first, last = history[0], history[-1]
    if not math.isfinite(last.loss + last.aux_loss):
        if tty:
            print()
        print(f"moec: error: the loss is not finite ({last.loss + last.aux_loss}) at step {last.step}: training "
              f"diverged; try a smaller --lr (now {lr:g})", file=sys.stderr)
        return 1
    verdict = "down" if last.loss < first.loss else "NOT down"
    print(f"loss {first.loss:.5f} -> {last.loss:.5f} ({verdict}) in {time.perf_counter() - start:.1f} s")
    if profile:
        data = {"model": path, "steps": steps,
                "tokens_per_expert": [[int(v) for v in c.tolist()] for c in routed]}
        with open(profile, "w") as fh:
            json.dump(data, fh, indent=1)
        print(f"routing profile (tokens per expert per MoE layer) written to {profile}")
    return 0 if last.loss < first.loss else 1


def rank_loads(plan: dict, counts: list, world_size: int) -> list[float]:
    """Tokens per step each rank's expert replicas process (a replica takes 1/replicas of its expert)."""
    loads = [0.0] * world_size
    for layer, c in zip(plan["layers"], counts):
        slots = len(layer["phy2log"]) // world_size
        replicas = [layer["phy2log"].count(e) for e in range(len(c))]
        for slot, e in enumerate(layer["phy2log"]):
            loads[slot // slots] += float(c[e]) / replicas[e]
    return loads


def _run_expert_parallel(path: str, steps: int, tokens: int, seq: int, lr: float, seed: int, plan_path: str) -> int:
    """One rank of an expert-parallel run started by torchrun (gloo on CPU, NCCL on GPUs)."""
    import moec
    import torch.distributed as dist
    from moec.driver import compile_model, task_count

    if "WORLD_SIZE" not in os.environ:
        print("moec: error: --plan trains expert-parallel: start it with "
              "`torchrun --nproc_per_node=N -m moec.cli train FILE --plan PLAN.json`", file=sys.stderr)
        return 1
    try:
        with open(plan_path) as fh:
            plan = json.load(fh)
    except (OSError, ValueError) as exc:
        print(f"moec: error: cannot read placement plan `{plan_path}`: {exc}", file=sys.stderr)
        return 1
    from moec.backends import BackendError
    from moec.backends.pytorch.codegen import render

    world = int(os.environ["WORLD_SIZE"])
    comp = compile_model(path)
    try:  # the plan must fit the model: checked before any rank waits for the others
        render(comp.graph, path, plan=plan)
    except BackendError as exc:
        print(f"moec: error: {exc}", file=sys.stderr)
        return 1
    if plan["num_devices"] != world:
        print(f"moec: error: the plan `{plan_path}` places experts on {plan['num_devices']} devices, but "
              f"torchrun started {world} ranks (--nproc_per_node={plan['num_devices']})", file=sys.stderr)
        return 1
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank()
    try:
        model = moec.load(path, seed=seed, plan=plan, rank=rank, world_size=world)
        ep_modules = [m for m in model.modules() if hasattr(m, "sync_replica_grads")]
        expert_params = {id(p) for m in ep_modules for p in m.parameters()}
        dense = [p for p in model.parameters() if id(p) not in expert_params]
        data = SyntheticTask(model.d_model, len(model.modalities), seed, task_count(comp.graph))
        data.g.manual_seed(seed + 1000 * (rank + 1))  # each rank its own tokens, same teacher
        seq = max(1, min(seq, tokens))
        x, modality, task, target = data.batch(max(1, tokens // seq), seq)
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        first = last = None
        for step in range(1, steps + 1):
            out = model(x, modality, task)
            mse = torch.nn.functional.mse_loss(out.output, target)
            opt.zero_grad(set_to_none=True)
            (mse + out.aux_loss).backward()
            for p in dense:  # data parallel over the dense weights: average
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= world
            for m in ep_modules:  # expert grads already hold every rank's tokens
                m.sync_replica_grads(scale=1.0 / world)
            opt.step()
            model.after_step()
            loss = torch.tensor([float(mse.detach())])
            dist.all_reduce(loss)
            counts = [c.detach().clone() for c in out.expert_counts]
            for c in counts:
                dist.all_reduce(c)
            loads = rank_loads(plan, counts, world)
            mean = sum(loads) / world
            first = first if first is not None else float(loss) / world
            last = float(loss) / world
            if rank == 0 and (step % max(1, steps // 10) == 0 or step in (1, steps)):
                print(f"step {step:>4}/{steps}  loss {last:.5f}  per-rank expert load "
                      f"{[round(v) for v in loads]}  max/mean {max(loads) / max(mean, 1e-9):.2f}", flush=True)
        if rank == 0:
            print(f"loss {first:.5f} -> {last:.5f} ({'down' if last < first else 'NOT down'}) on {world} ranks")
        status = 0 if last < first else 1
    except BaseException:
        dist.destroy_process_group()
        raise
    dist.barrier()
    dist.destroy_process_group()
    # gloo can abort ("terminate called without an active exception") while the interpreter tears
    # down its threads after a finished run; the run is complete, so leave without that teardown
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
