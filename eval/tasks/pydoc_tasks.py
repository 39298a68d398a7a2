"""``custom_dataset`` hooks of the shipped task YAMLs (lm-eval imports this file by path).

lm-eval calls them with the task's metadata and ``dataset_kwargs`` as keyword arguments; the data
files are generated into the cache at run time (see ``compress.eval.taskdata``).
"""

from compress.eval.taskdata import dataset


def pydoc_ppl(**kwargs):
    return dataset("pydoc_ppl")


def pydoc_lastword(**kwargs):
    return dataset("pydoc_lastword")
