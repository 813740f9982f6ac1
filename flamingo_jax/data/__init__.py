"""Input pipelines: `synthetic` (an on-the-fly few-shot task for the CPU demo)."""
