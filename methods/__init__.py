"""KV-cache methods, one file each (installed as scbench.methods). See CONTRIBUTING.md to add one."""
