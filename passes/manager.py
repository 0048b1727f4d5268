"""Pass infrastructure: a pass is a small named object; pipelines are lists of pass names."""

from __future__ import annotations

from dataclasses import dataclass, field

from moec.ir import Graph


@dataclass
class PassContext:
    """State shared by the passes of one pipeline run (analysis results land here)."""

    results: dict = field(default_factory=dict)


class Pass:
    name: str = ""
    description: str = ""

    def run(self, graph: Graph, ctx: PassContext) -> bool:  # returns whether the graph changed
        raise NotImplementedError


class PassFailed(Exception):
    def __init__(self, name: str, done: list[str], cause: Exception):
        self.pass_name, self.done, self.cause = name, done, cause
        after = f" (after {', '.join(done)})" if done else ""
        super().__init__(f"pass `{name}` failed{after}: {cause}")


def run_pipeline(graph: Graph, passes: list[Pass], ctx: PassContext | None = None, stop_after: str | None = None,
                 verify=None) -> PassContext:
    """Run passes in order, verifying the graph after each; stop after `stop_after` if given."""
    ctx = ctx or PassContext()
    done: list[str] = []
    for p in passes:
        try:
            p.run(graph, ctx)
            if verify is not None:
                verify(graph)
        except Exception as exc:  # a failing pass is named, with the passes already run
            raise PassFailed(p.name, done, exc) from exc
        done.append(p.name)
        if p.name == stop_after:
            break
    ctx.results["passes_run"] = done
    return ctx
