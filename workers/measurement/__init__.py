"""What a model costs and scores: parameters, MACs, latency (torch and ONNX Runtime), metrics records, summaries."""
