"""oni-sys: reinforcement learning with intrinsic rewards learned online from LLM feedback."""

__version__ = "0.1.0"
