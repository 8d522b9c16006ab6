"""Orchestration: running a recipe (data -> teacher -> student -> export -> report), search and the demo.

Thin layers over the components, as torchtune's recipes are: ``stages`` (data, teacher, student
architecture), ``student`` (``distill``), ``recipe_run`` (``run_recipe``), ``deploy`` (export files),
``search`` and ``demo``; ``rundir`` owns the run folder.
"""

from qdistill.runs.demo import run_demo
from qdistill.runs.deploy import export_directory
from qdistill.runs.recipe_run import run_recipe
from qdistill.runs.rundir import RunDir, load_run
from qdistill.runs.search import run_search
from qdistill.runs.student import Result, distill

__all__ = ["Result", "RunDir", "distill", "export_directory", "load_run", "run_demo", "run_recipe", "run_search"]
