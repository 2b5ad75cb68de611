"""What the objectives that steer a policy share: the frozen reference and log-probabilities (``policy``), preference
models and the DPO loss, reward scoring, sampling rollouts and GAE.

Layer: above ``parts``, the top of the library. Imports ``parts``, ``data``, ``engine``, ``models`` and what is below.
"""
