"""residtap: read, probe, lens and steer a transformer's activations inside its own forward pass.

    import residtap
    with residtap.capture(model, ["layers.3", "logits"]) as acts:
        model(**batch)
    acts["layers.3"]            # (B, T, d_model), the residual stream after block 3
"""

__version__ = "0.1.0"
