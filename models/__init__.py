"""dimstream.models: mixed-dimension TorchRec embeddings and the CTR heads (DeepFM, W&D, FM, DCN-V2)."""
