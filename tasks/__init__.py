"""SCBench tasks, one file each (installed as scbench.tasks)."""
