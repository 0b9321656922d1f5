"""Data: the exact Gaussian family (l2m.data.gaussian, math only), the DataModules built on it and on
text (Lightning), and the contract they fulfil for training (l2m.data.contract).

Nothing is imported here, so that the math never pulls in Lightning.
"""
