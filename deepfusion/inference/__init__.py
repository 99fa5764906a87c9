"""Models over clips and over libraries of files, through the caches; the torch and onnx engines."""
