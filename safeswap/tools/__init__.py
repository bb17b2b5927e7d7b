"""The functions behind the commands that steer and rehearse rollouts from outside the
worker: start and steer (`rollouts`), rehearse (`simulate`, `replay`, `judge_sim`), the
demo and the dev broker, and the status views. No typer here: `safeswap/cli/` wraps them."""
