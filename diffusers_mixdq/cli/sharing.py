"""``mixdq push``: publish plans and a model card to the Hugging Face Hub."""

from __future__ import annotations

from typing import Optional

import typer

from .app import app, console, user_errors


@app.command()
def push(
    plan_dir: str = typer.Argument(
        ...,
        help="Plan directory (plan.json at its root and/or in component folders such as unet/) or a plan .json file.",
    ),
    repo_id: str = typer.Argument(..., help="Hub model repository, namespace/name (created if missing)."),
    private: bool = typer.Option(False, "--private", help="Create the repository private."),
    revision: Optional[str] = typer.Option(
        None, "--revision", help="Branch to commit to (created from main if missing). Default: main."
    ),
    commit_message: Optional[str] = typer.Option(None, "--commit-message", help="Commit message."),
    component: Optional[str] = typer.Option(
        None, "--component", help="Publish a root-level plan in this component's folder instead (e.g. unet)."
    ),
):
    """Publish plans and a generated model card (README.md) to the Hugging Face Hub, in one commit.

    Authentication: `hf auth login` or the HF_TOKEN environment variable.
    """
    from ..hub import push_plan

    with user_errors():
        info = push_plan(plan_dir, repo_id, private=private, revision=revision, commit_message=commit_message,
                         component=component)
    console.print(f"pushed {plan_dir} to {repo_id}: commit {info.oid}")
    console.print(info.commit_url)
