"""HTTP front of one pdserve server: FastAPI app (OpenAI + SGLang-native endpoints), the engine
process it drives over ZMQ, and `pdserve serve` (see serve.py for the lifecycle)."""
