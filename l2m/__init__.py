"""l2m: long-context language modelling under the L²M mutual-information scaling law."""

__version__ = "0.1.0"
