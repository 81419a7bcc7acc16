"""Names of the Feast objects and the features they serve.

Apart from `store` (which imports Feast), so the model server and the flows can name
them without loading Feast's offline machinery.
"""

PROJECT = "sluicegate"
FEATURE_SERVICE = "fraud_model_v1"
CUSTOMER_VIEW = "customer_activity"
MERCHANT_VIEW = "merchant_risk"
CUSTOMER_ENTITY = "customer"
MERCHANT_ENTITY = "merchant"

CUSTOMER_FEATURES = [
    "cust_txn_count_1h",
    "cust_txn_count_24h",
    "cust_amount_mean_7d",
    "cust_amount_std_7d",
    "cust_minutes_since_prev",
]
MERCHANT_FEATURES = ["merch_txn_count_24h", "merch_fraud_rate_30d"]
FEATURE_NAMES = CUSTOMER_FEATURES + MERCHANT_FEATURES
