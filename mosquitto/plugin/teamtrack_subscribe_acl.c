/*
 * teamtrack_subscribe_acl: a Mosquitto 2.0 plugin that refuses subscriptions the ACL does not
 * allow the account to read.
 *
 * Mosquitto 2.0's acl_file grants every SUBSCRIBE ("FIXME - implement ACL subscription strings"
 * in src/security_default.c) and checks `read` only when it delivers a message. For a shared
 * subscription that is harmful: any account could join `$share/<group>/<filter>`, the broker
 * then routed a share of the group's messages to it and, failing the read check, dropped them.
 *
 * This plugin reads the same acl_file (plugin_opt_acl_file) and answers every SUBSCRIBE: it is
 * granted only if one of the account's `topic read|readwrite FILTER` lines covers the requested
 * filter, every topic it can match, and no `topic deny FILTER` line of the account overlaps it.
 * A shared subscription `$share/G/F` needs a line that covers it literally (`$share/G/...`), so
 * only the accounts listed for that group can join it. Everything else (publishing, delivery,
 * unsubscribing) is left to the acl_file (MOSQ_ERR_PLUGIN_DEFER). Lines before the first `user`
 * line (anonymous clients) and `pattern` lines grant no subscription. The file is read again on
 * SIGHUP; if it cannot be read, the rules in force are kept.
 *
 * Revocation: on that reload, every account that is no longer in the file, or whose `topic`
 * lines changed, is disconnected (mosquitto_kick_client_by_username, Will sent): whatever it
 * was granted under the old rules (subscriptions, a place in a share group) goes with the
 * connection, and it must connect and subscribe again under the new ones. Mosquitto itself
 * disconnects clients whose password line went or changed when it reloads its password file.
 *
 * The few declarations of the plugin interface (version 5) are copied from Mosquitto 2.0's
 * public headers (mosquitto.h, mosquitto_plugin.h, mosquitto_broker.h), so that the plugin
 * builds without the development packages: cc -shared -fPIC -O2 -o x.so this.c
 */
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- From Mosquitto 2.0's public headers --------------------------------------------------- */
struct mosquitto;
typedef struct mosquitto_plugin_id_t mosquitto_plugin_id_t;
typedef struct mqtt5__property mosquitto_property;
struct mosquitto_opt { char *key; char *value; };
enum { MOSQ_EVT_RELOAD = 1, MOSQ_EVT_ACL_CHECK = 2 };
struct mosquitto_evt_reload {
	void *future; struct mosquitto_opt *options; int option_count; void *future2[4];
};
struct mosquitto_evt_acl_check {
	void *future; struct mosquitto *client; const char *topic; const void *payload;
	mosquitto_property *properties; int access; uint32_t payloadlen; uint8_t qos; bool retain;
	void *future2[4];
};
#define MOSQ_ACL_SUBSCRIBE 0x04
#define MOSQ_ERR_SUCCESS 0
#define MOSQ_ERR_NOMEM 1
#define MOSQ_ERR_INVAL 3
#define MOSQ_ERR_ACL_DENIED 12
#define MOSQ_ERR_PLUGIN_DEFER 17
#define MOSQ_LOG_NOTICE (1 << 1)
#define MOSQ_LOG_ERR (1 << 3)
typedef int (*MOSQ_FUNC_generic_callback)(int, void *, void *);
int mosquitto_callback_register(mosquitto_plugin_id_t *identifier, int event,
		MOSQ_FUNC_generic_callback cb_func, const void *event_data, void *userdata);
int mosquitto_callback_unregister(mosquitto_plugin_id_t *identifier, int event,
		MOSQ_FUNC_generic_callback cb_func, const void *event_data);
const char *mosquitto_client_username(const struct mosquitto *client);
int mosquitto_kick_client_by_username(const char *username, bool with_will);
const char *mosquitto_client_id(const struct mosquitto *client);
void mosquitto_log_printf(int level, const char *fmt, ...);
/* -------------------------------------------------------------------------------------------- */

#define PLUGIN "teamtrack_subscribe_acl"
#define BUCKETS 65536u

struct rule {
	struct rule *next;
	bool deny;
	char filter[];
};

struct account {
	struct account *next;
	struct rule *rules;
	uint64_t digest; /* of its topic lines, in order: a change means new rules */
	char name[];
};

struct rules {
	struct account *buckets[BUCKETS];
	size_t accounts;
	size_t lines;
};

static mosquitto_plugin_id_t *plugin_id;
static char *acl_path;
static struct rules *current;

static uint64_t digest_add(uint64_t value, const char *text)
{
	for(; *text; text++){
		value = (value ^ (uint8_t)*text) * 1099511628211u;
	}
	return (value ^ '\n') * 1099511628211u;
}

static uint32_t hash(const char *text)
{
	uint32_t value = 2166136261u;
	for(; *text; text++){
		value = (value ^ (uint8_t)*text) * 16777619u;
	}
	return value % BUCKETS;
}

static void rules_free(struct rules *rules)
{
	if(!rules) return;
	for(size_t i = 0; i < BUCKETS; i++){
		struct account *account = rules->buckets[i];
		while(account){
			struct account *next_account = account->next;
			struct rule *rule = account->rules;
			while(rule){
				struct rule *next_rule = rule->next;
				free(rule);
				rule = next_rule;
			}
			free(account);
			account = next_account;
		}
	}
	free(rules);
}

static struct account *account_find(const struct rules *rules, const char *name)
{
	struct account *account = rules->buckets[hash(name)];
	while(account && strcmp(account->name, name)) account = account->next;
	return account;
}

static struct account *account_add(struct rules *rules, const char *name)
{
	struct account *account = account_find(rules, name);
	if(account) return account;
	account = calloc(1, sizeof(*account) + strlen(name) + 1);
	if(!account) return NULL;
	strcpy(account->name, name);
	account->digest = 14695981039346656037u;
	uint32_t bucket = hash(name);
	account->next = rules->buckets[bucket];
	rules->buckets[bucket] = account;
	rules->accounts++;
	return account;
}

static char *trim(char *text)
{
	while(*text == ' ' || *text == '\t') text++;
	size_t length = strlen(text);
	while(length && strchr(" \t\r\n", text[length - 1])) text[--length] = '\0';
	return text;
}

/* The rest of the line after a keyword and blanks, or NULL if the line does not start so. */
static char *after(char *line, const char *keyword)
{
	size_t length = strlen(keyword);
	if(strncmp(line, keyword, length) || (line[length] != ' ' && line[length] != '\t')) return NULL;
	return trim(line + length);
}

static struct rules *rules_load(const char *path)
{
	FILE *file = fopen(path, "r");
	if(!file){
		mosquitto_log_printf(MOSQ_LOG_ERR, PLUGIN ": cannot read %s", path);
		return NULL;
	}
	struct rules *rules = calloc(1, sizeof(*rules));
	if(!rules){
		fclose(file);
		return NULL;
	}
	struct account *account = NULL;
	char *buffer = NULL;
	size_t capacity = 0;
	bool failed = false;
	while(!failed && getline(&buffer, &capacity, file) != -1){
		char *line = trim(buffer), *rest;
		if(line[0] == '\0' || line[0] == '#') continue;
		if((rest = after(line, "user"))){
			account = account_add(rules, rest);
			failed = account == NULL;
		}else if((rest = after(line, "topic"))){
			if(!account) continue; /* anonymous clients: no subscription granted */
			account->digest = digest_add(account->digest, rest);
			bool deny = false, reads = true;
			char *filter;
			if((filter = after(rest, "read")) || (filter = after(rest, "readwrite"))){
				reads = true;
			}else if((filter = after(rest, "write"))){
				reads = false;
			}else if((filter = after(rest, "deny"))){
				deny = true;
			}else{
				filter = rest; /* no access keyword: readwrite */
			}
			if(!reads || filter[0] == '\0') continue;
			struct rule *rule = calloc(1, sizeof(*rule) + strlen(filter) + 1);
			if(!rule){
				failed = true;
				break;
			}
			rule->deny = deny;
			strcpy(rule->filter, filter);
			rule->next = account->rules;
			account->rules = rule;
			rules->lines++;
		}
		/* `pattern` lines grant no subscription; other lines are mosquitto's to reject. */
	}
	free(buffer);
	fclose(file);
	if(failed){
		mosquitto_log_printf(MOSQ_LOG_ERR, PLUGIN ": out of memory reading %s", path);
		rules_free(rules);
		return NULL;
	}
	return rules;
}

/* The next level of a topic filter: its length, and *text moved past it (and its '/'). */
static size_t next_level(const char **text, bool *more)
{
	const char *start = *text, *slash = strchr(start, '/');
	size_t length = slash ? (size_t)(slash - start) : strlen(start);
	*more = slash != NULL;
	*text = slash ? slash + 1 : start + length;
	return length;
}

static bool is_wildcard(const char *level, size_t length, char which)
{
	return length == 1 && level[0] == which;
}

/* Does the ACL filter `allowed` match every topic that the subscription `wanted` can match? */
static bool covers(const char *allowed, const char *wanted)
{
	bool first = true, allowed_more = true, wanted_more = true;
	while(allowed_more){
		const char *a = allowed;
		size_t a_length = next_level(&allowed, &allowed_more);
		if(is_wildcard(a, a_length, '#')){
			/* Wildcards never match a first level that starts with '$' ($share, $SYS). */
			return !(first && wanted_more && wanted[0] == '$');
		}
		if(!wanted_more) return false; /* `allowed` is longer than every topic of `wanted` */
		const char *w = wanted;
		size_t w_length = next_level(&wanted, &wanted_more);
		if(is_wildcard(w, w_length, '#')) return false;
		if(is_wildcard(a, a_length, '+')){
			if(first && w_length && w[0] == '$') return false;
		}else if(a_length != w_length || memcmp(a, w, a_length) || is_wildcard(w, w_length, '+')){
			return false;
		}
		first = false;
		if(!allowed_more && wanted_more){
			/* `a/b` covers `a/b/#` only for the topic `a/b` itself: not all of it */
			return false;
		}
	}
	return !wanted_more;
}

/* Can some topic match both filters? */
static bool overlaps(const char *one, const char *two)
{
	bool one_more = true, two_more = true;
	while(one_more && two_more){
		const char *a = one, *b = two;
		size_t a_length = next_level(&one, &one_more);
		size_t b_length = next_level(&two, &two_more);
		if(is_wildcard(a, a_length, '#') || is_wildcard(b, b_length, '#')) return true;
		if(is_wildcard(a, a_length, '+') || is_wildcard(b, b_length, '+')) continue;
		if(a_length != b_length || memcmp(a, b, a_length)) return false;
	}
	if(one_more) return strcmp(one, "#") == 0;
	if(two_more) return strcmp(two, "#") == 0;
	return true;
}

static bool may_subscribe(const struct rules *rules, const char *username, const char *filter)
{
	const struct account *account = username ? account_find(rules, username) : NULL;
	if(!account) return false;
	bool covered = false;
	for(const struct rule *rule = account->rules; rule; rule = rule->next){
		if(rule->deny){
			if(overlaps(rule->filter, filter)) return false;
		}else if(!covered && covers(rule->filter, filter)){
			covered = true;
		}
	}
	return covered;
}

static int on_acl_check(int event, void *event_data, void *userdata)
{
	(void)event;
	(void)userdata;
	struct mosquitto_evt_acl_check *check = event_data;
	if(check->access != MOSQ_ACL_SUBSCRIBE) return MOSQ_ERR_PLUGIN_DEFER;
	const char *username = mosquitto_client_username(check->client);
	if(current && may_subscribe(current, username, check->topic)) return MOSQ_ERR_SUCCESS;
	mosquitto_log_printf(MOSQ_LOG_NOTICE, PLUGIN ": refused subscription of %s to %s",
			username ? username : "(anonymous)", check->topic);
	return MOSQ_ERR_ACL_DENIED;
}

/* Disconnect the accounts of `before` that `after` no longer lists or lists with other rules. */
static size_t kick_changed(const struct rules *before, const struct rules *after)
{
	size_t kicked = 0;
	for(size_t i = 0; i < BUCKETS; i++){
		for(const struct account *old = before->buckets[i]; old; old = old->next){
			const struct account *now = account_find(after, old->name);
			if(now && now->digest == old->digest) continue;
			if(mosquitto_kick_client_by_username(old->name, true) == MOSQ_ERR_SUCCESS){
				mosquitto_log_printf(MOSQ_LOG_NOTICE, PLUGIN ": %s %s: disconnected",
						old->name, now ? "has new rules" : "was removed");
			}
			kicked++;
		}
	}
	return kicked;
}

static int load(void)
{
	struct rules *rules = rules_load(acl_path);
	if(!rules) return MOSQ_ERR_INVAL;
	struct rules *before = current;
	current = rules;
	if(before){
		size_t changed = kick_changed(before, rules);
		if(changed){
			mosquitto_log_printf(MOSQ_LOG_NOTICE, PLUGIN ": %zu accounts removed or changed",
					changed);
		}
	}
	rules_free(before);
	mosquitto_log_printf(MOSQ_LOG_NOTICE, PLUGIN ": %zu accounts, %zu read rules from %s",
			rules->accounts, rules->lines, acl_path);
	return MOSQ_ERR_SUCCESS;
}

static int on_reload(int event, void *event_data, void *userdata)
{
	(void)event;
	(void)event_data;
	(void)userdata;
	/* If the file cannot be read now, the rules in force stay (and the error is logged). */
	load();
	return MOSQ_ERR_PLUGIN_DEFER;
}

int mosquitto_plugin_version(int supported_version_count, const int *supported_versions)
{
	for(int i = 0; i < supported_version_count; i++){
		if(supported_versions[i] == 5) return 5;
	}
	return -1;
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **userdata,
		struct mosquitto_opt *options, int option_count)
{
	(void)userdata;
	for(int i = 0; i < option_count; i++){
		if(!strcmp(options[i].key, "acl_file")) acl_path = strdup(options[i].value);
	}
	if(!acl_path){
		mosquitto_log_printf(MOSQ_LOG_ERR, PLUGIN ": plugin_opt_acl_file is required");
		return MOSQ_ERR_INVAL;
	}
	int rc = load();
	if(rc != MOSQ_ERR_SUCCESS) return rc;
	plugin_id = identifier;
	rc = mosquitto_callback_register(identifier, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL, NULL);
	if(rc != MOSQ_ERR_SUCCESS) return rc;
	return mosquitto_callback_register(identifier, MOSQ_EVT_RELOAD, on_reload, NULL, NULL);
}

int mosquitto_plugin_cleanup(void *userdata, struct mosquitto_opt *options, int option_count)
{
	(void)userdata;
	(void)options;
	(void)option_count;
	if(plugin_id){
		mosquitto_callback_unregister(plugin_id, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL);
		mosquitto_callback_unregister(plugin_id, MOSQ_EVT_RELOAD, on_reload, NULL);
	}
	rules_free(current);
	current = NULL;
	free(acl_path);
	acl_path = NULL;
	return MOSQ_ERR_SUCCESS;
}
