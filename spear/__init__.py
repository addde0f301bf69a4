"""spear: the SPEAR recipe (arXiv 2509.22601) for training tool-using, multi-turn LLM agents.

Group RL (GRPO / Dr.GRPO / GiGPO, Dr.BoT tricks) plus curriculum self-imitation learning with
advantage recalibration, an intrinsic tool-call reward, and Clip-Cov / KL-Cov entropy control.
"""

__version__ = "0.1.0"
