"""dimstream.stream: schemas, sources, decoding to KeyedJaggedTensor, windowing.

Knows Arrow, TorchRec's sparse tensors and event time; knows nothing of models."""
