"""InnerControl: ControlNet training aligned by intermediate-feature feedback from control-prediction probes."""

__version__ = "0.1.0"
