"""recsys: a batch two-tower recommender for H&M fashion retail (Spark + Delta + PyTorch + FAISS + MLflow)."""

__version__ = "0.1.0"
