"""The tiny synthetic run config the training, export and serving tests share."""

TINY = {
    "name": "tiny",
    "data": {"kind": "synthetic", "num_users": 400, "num_items": 200,
             "exposures_per_user": 30, "seed": 1},
    "features": {
        "user": [{"name": "user_id", "type": "categorical", "embedding_dim": 16},
                 {"name": "age", "type": "continuous", "buckets": 4},
                 {"name": "favorite_genres", "type": "multi_categorical"}],
        "item": [{"name": "item_id", "type": "categorical", "embedding_dim": 16},
                 {"name": "category", "type": "categorical"},
                 {"name": "tags", "type": "multi_categorical"},
                 {"name": "price", "type": "continuous", "log1p": True}],
    },
    "model": {"query_tower": {"output_dim": 16}, "candidate_tower": {"output_dim": 16}},
    "training": {"epochs": 6, "batch_size": 256, "learning_rate": 0.01},
    "evaluation": {"protocol": "random", "ks": [10, 50]},
}
