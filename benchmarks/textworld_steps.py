"""TextWorld benchmark: generation time per game, random-play win rate, env steps/s in a pool.

    python benchmarks/textworld_steps.py --challenge tw-coin_collector --level 5 \
        --games 32 --episodes-per-game 4 --max-steps 50 --batches 32 128 --workers 2

1. Generates ``--games`` fresh games (in a temporary cache unless ``--cache-dir``) with
   ``--gen-workers`` processes: mean seconds per game (inside a worker) and wall-clock games/s.
2. Plays every game ``--episodes-per-game`` times in-process through :class:`TextWorldEnv` with
   uniformly random admissible actions for at most ``--max-steps`` actions: win rate, mean length,
   and single-env steps/s.
3. For each batch size B, a :class:`ProcessEnvPool` with ``--workers`` processes hosting B /
   workers envs each steps B games with random admissible actions for ``--calls`` batch calls,
   resetting finished slots onto the next game: env steps/s (resets included in the wall time).
Prints one markdown block; results are recorded in benchmarks/textworld_steps.md.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from spear.envs.base import Task
from spear.envs.textworld_env import TextWorldEnv, TextWorldParams, TextWorldTasks
from spear.envs.textworld_games import PoolParams, ProcessEnvPool, game_spec


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--challenge", default="tw-coin_collector")
    p.add_argument("--level", type=int, default=5)
    p.add_argument("--games", type=int, default=32)
    p.add_argument("--gen-workers", type=int, default=2)
    p.add_argument("--episodes-per-game", type=int, default=4)
    p.add_argument("--max-steps", type=int, default=50)
    p.add_argument("--batches", type=int, nargs="*", default=[32, 128])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--calls", type=int, default=60)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def _act(admissible: list[str], rng: random.Random) -> str:
    return f"<action>{rng.choice(admissible)}</action>"


def random_play(
    tasks: list[Task], params: TextWorldParams, episodes: int, seed: int
) -> dict[str, float]:
    """Win rate, mean episode length and in-process steps/s of random admissible play."""
    rng, env = random.Random(seed), TextWorldEnv(params)
    wins, lengths, steps, start = 0, [], 0, time.perf_counter()
    for task in tasks:
        for _ in range(episodes):
            _, info = env.reset(task)
            done, n = False, 0
            while not done:
                res = env.step(_act(info["admissible_actions"], rng))
                info, done, n = res.info, res.terminated or res.truncated, n + 1
            wins += bool(info["success"])
            lengths.append(n)
            steps += n
    env.close()
    total = len(tasks) * episodes
    return {
        "win_rate": wins / total,
        "episodes": total,
        "mean_len": statistics.mean(lengths),
        "steps_per_s": steps / (time.perf_counter() - start),
    }


def pool_throughput(
    tasks: list[Task], params: TextWorldParams, batch: int, workers: int, calls: int, seed: int
) -> dict[str, float]:
    """Env steps/s of ``batch`` games stepped together in a process pool (auto-reset)."""
    if batch % workers:
        raise ValueError(f"batch {batch} must be a multiple of --workers {workers}")
    pool_params = PoolParams(
        num_workers=workers,
        envs_per_worker=batch // workers,
        timeout_s=60.0,
        startup_timeout_s=120.0,
        start_method="spawn",
    )
    rng, next_game = random.Random(seed), 0
    with ProcessEnvPool(partial(TextWorldEnv, params), pool_params) as pool:
        infos = [r.info for r in pool.reset([tasks[i % len(tasks)] for i in range(batch)]) if r]
        next_game = batch
        pool.step([_act(i["admissible_actions"], rng) for i in infos])  # warm-up call
        steps, resets, start = 0, 0, time.perf_counter()
        for _ in range(calls):
            results = pool.step([_act(i["admissible_actions"], rng) for i in infos])
            steps += len(results)
            done = [k for k, r in enumerate(results) if r.terminated or r.truncated]
            for k, r in enumerate(results):
                infos[k] = r.info
            if done:
                fresh = [None] * batch
                for k in done:
                    fresh[k] = tasks[next_game % len(tasks)]
                    next_game += 1
                for k, r in enumerate(pool.reset(fresh)):
                    if r is not None:
                        infos[k] = r.info
                resets += len(done)
        elapsed = time.perf_counter() - start
        failures = pool.stats.crashes + pool.stats.timeouts + pool.stats.env_errors
    return {"steps_per_s": steps / elapsed, "steps": steps, "resets": resets, "failures": failures}


def main() -> None:
    torch.set_num_threads(1)
    a = _args()
    params = TextWorldParams(
        history_length=2, max_steps=a.max_steps, invalid_action_penalty=0.1, numbered_actions=False
    )
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(a.cache_dir) if a.cache_dir else Path(tmp)
        source = TextWorldTasks(
            spec=game_spec(a.challenge, a.level),
            cache_dir=cache,
            env_params=params,
            num_train_games=a.games,
            gen_workers=a.gen_workers,
            progress=True,
        )
        seeds = list(range(a.games))
        start = time.perf_counter()
        gen = source.cache.ensure(seeds, workers=a.gen_workers, progress=True)
        wall = time.perf_counter() - start
        fresh = [r.seconds for r in gen.values() if not r.cached and r.ok]
        tasks = source.tasks("train", a.games, seed=a.seed)
        play = random_play(tasks, params, a.episodes_per_game, a.seed)
        pools = {
            b: pool_throughput(tasks, params, b, a.workers, a.calls, a.seed) for b in a.batches
        }
    print(f"## {a.challenge} level {a.level}, max_steps {a.max_steps}")
    if fresh:
        print(
            f"- generation: {len(fresh)} games, {statistics.mean(fresh):.2f} s/game inside a worker, "
            f"{len(fresh) / wall:.2f} games/s wall with {a.gen_workers} workers"
        )
    print(
        f"- random admissible play: win rate {play['win_rate']:.3f} over {play['episodes']} episodes, "
        f"mean length {play['mean_len']:.1f}, in-process {play['steps_per_s']:.0f} steps/s"
    )
    print(
        "\n| batch | workers | env steps/s | steps | resets | failures |\n|---|---|---|---|---|---|"
    )
    for b, r in pools.items():
        print(
            f"| {b} | {a.workers} | {r['steps_per_s']:.0f} | {r['steps']:.0f} | {r['resets']:.0f} | {r['failures']:.0f} |"
        )


if __name__ == "__main__":
    main()
